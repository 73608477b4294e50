"""One optimizer step of multi-task training: plan -> per-task forwards -> one backward -> update.

    total = sum_t  w_t L_t + a_lb LB_t + a_z Z_t       (each task micro-batch of the step's plan)
          + a_mi * MI(A)                               (Mod-Squad's task-expert mutual information)

One backward over the sum (decision 1 of the issue-4 contract): the MI loss couples the tasks, so its
exact gradient needs every task's graph at once, and DeepSpeed runs with gradient_accumulation_steps=1
whatever the number of micro-batches in the step.

MI across ranks (decision 2): per MoE layer the statistics A[t, e] (router probability mass) are summed
over all ranks, value-wise, while the gradient flows through this rank's tokens only:
``A = A_local + (all_reduce_sum(A_local) - A_local)`` with the reduced part detached. The engine then
averages gradients over the world size W, so each rank's MI term is scaled by W: the update equals the
gradient of ``a_mi * MI(A_global)`` a single process would take on the global batch. The task marginal
is the schedule's real sampling ratio (``task_prior``), not this batch's token counts.

Every rank runs the same plan (same tasks, same order), so the all-to-alls inside MoE layers and the
two all-reduces here pair up on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from moevit.config.schema import AuxLossConfig
from moevit.data.collate import move_batch
from moevit.data.multitask import StepPlan
from moevit.layers import load_balance_loss, mean_mutual_information_loss, router_z_loss, task_expert_matrices
from moevit.layers.router import Routing
from moevit.parallel.collectives import all_reduce_sum


@dataclass
class StepResult:
    """What one step measured; losses are means over ranks (identical on every rank)."""

    task_losses: dict[
        str, dict[str, float]
    ]  # task -> {"loss", head parts, "load_balance", "z_loss", "weight"}
    mutual_information: float | None  # None: no MoE layer, or the MI coefficient is 0
    total: float  # the optimised objective (MI unscaled by the world size)
    images: int  # images of the step over all ranks
    expert_counts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> task -> (E,)


def globally_summed(local: torch.Tensor) -> torch.Tensor:
    """The all-rank sum as value, with the gradient of `local` only (decision 2)."""
    return local + (all_reduce_sum(local) - local.detach())


class MultiTaskStep:
    """Runs one step on an engine with the contract's interface (`engine(task, batch) -> TaskOutput`,
    `engine.backward(loss)`, `engine.step()`).

    Args:
        engine: the DeepSpeed engine (or any object with that interface).
        tasks: every task of the model, in config order (rows of the MI statistics).
        aux_loss: coefficients of the auxiliary MoE losses.
        task_prior: the real fraction of training samples per task (the schedule's expected ratios).
        world_size: ranks whose gradients the engine averages.
        device: where batches go.
    """

    def __init__(
        self,
        engine,
        tasks: Sequence[str],
        aux_loss: AuxLossConfig,
        task_prior: Mapping[str, float],
        world_size: int,
        device: torch.device,
    ):
        self.engine = engine
        self.tasks = list(tasks)
        self.aux_loss = aux_loss
        self.task_prior_T = torch.tensor([task_prior[task] for task in self.tasks], dtype=torch.float32)
        self.world_size = world_size
        self.device = device

    def __call__(self, plan: StepPlan, weights: Mapping[str, float]) -> StepResult:
        task_total = torch.zeros((), device=self.device)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        routing_by_task: dict[str, dict[str, Routing]] = {}
        images = 0
        for task, batch in plan:
            batch = move_batch(batch, self.device)
            images += batch["images"].shape[0]
            output = self.engine(task, batch)
            objective, parts[task] = self.task_objective(
                output.losses, list(output.routing.values()), weights[task]
            )
            task_total = task_total + objective
            routing_by_task[task] = output.routing
        mutual_information = self.mutual_information(routing_by_task)
        total = task_total
        if mutual_information is not None:
            total = total + self.aux_loss.mutual_information * self.world_size * mutual_information
        self.engine.backward(total)
        self.engine.step()

        result = self.reduce_over_ranks(parts, task_total, mutual_information, images)
        for task in plan.tasks:
            result.task_losses[task]["weight"] = weights[task]
        result.expert_counts = {
            layer: {task: routing_by_task[task][layer].counts_E.detach().cpu() for task in plan.tasks}
            for layer in routing_by_task[plan.tasks[0]]
        }
        return result

    def task_objective(
        self, losses: Mapping[str, torch.Tensor], routings: list[Routing], weight: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A task micro-batch's weighted head loss plus its load-balance and z-losses."""
        parts = dict(losses)
        objective = weight * losses["loss"]
        if routings:
            parts["load_balance"] = load_balance_loss(routings)
            parts["z_loss"] = router_z_loss(routings)
            objective = objective + self.aux_loss.load_balance * parts["load_balance"]
            objective = objective + self.aux_loss.z_loss * parts["z_loss"]
        return objective, parts

    def mutual_information(self, routing_by_task: dict[str, dict[str, Routing]]) -> torch.Tensor | None:
        """MI of the all-rank task-expert statistics, averaged over MoE layers."""
        if self.aux_loss.mutual_information == 0 or not any(routing_by_task.values()):
            return None
        matrices = task_expert_matrices(
            {task: list(routing.values()) for task, routing in routing_by_task.items()}, self.tasks
        )
        # One collective for all layers: flatten, reduce, split back.
        flat = globally_summed(torch.cat([m.flatten() for m in matrices]))
        matrices = [chunk.view_as(m) for chunk, m in zip(flat.split([m.numel() for m in matrices]), matrices)]
        return mean_mutual_information_loss(matrices, self.task_prior_T.to(flat.device))

    def reduce_over_ranks(
        self,
        parts: dict[str, dict[str, torch.Tensor]],
        task_total: torch.Tensor,
        mutual_information: torch.Tensor | None,
        images: int,
    ) -> StepResult:
        """Means over ranks of every logged scalar, in one all-reduce (on the device: NCCL needs it)."""
        names = [(task, name) for task, named in parts.items() for name in named]
        values = [parts[task][name].detach().reshape(()) for task, name in names]
        values += [task_total.detach(), torch.tensor(float(images), device=self.device)]
        if mutual_information is not None:
            values.append(mutual_information.detach())
        summed = all_reduce_sum(torch.stack([v.double() for v in values])).tolist()
        means = [value / self.world_size for value in summed]
        task_losses: dict[str, dict[str, float]] = {task: {} for task in parts}
        for (task, name), value in zip(names, means):
            task_losses[task][name] = value
        mi_value = means[len(names) + 2] if mutual_information is not None else None
        total = means[len(names)] + (
            self.aux_loss.mutual_information * mi_value if mi_value is not None else 0.0
        )
        return StepResult(task_losses, mi_value, total, images=round(summed[len(names) + 1]))
