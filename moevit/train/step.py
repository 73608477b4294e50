"""One optimizer step of multi-task training: plan -> per-task forwards -> one backward -> update.

    total = sum_t  w_t L_t + a_lb LB_t + a_z Z_t       (each task micro-batch of the step's plan)
          + a_mi * MI(A)                               (Mod-Squad's task-expert mutual information)

One backward over the sum: the MI loss couples the tasks, so its exact gradient needs every task's graph
at once. That sum is one accumulation round.

Gradient accumulation (`train.grad_accum_steps` = G, DeepSpeed's gradient_accumulation_steps): a step
is G rounds, each one batch of every task of the step (the same tasks: moevit.data.multitask.StepPlan),
each round its own backward, which the engine divides by G; the update comes after the last round. A
step, in logs, checkpoints, the LR schedule and `train.steps`, is an optimizer step. The MI term is
exact: a no-grad forward of all G rounds first gives each round's task-expert matrices, and round r's MI
takes its own rows (with gradient) plus the other rounds' (detached), times G against the engine's 1/G,
so the rounds' gradients sum to the gradient of MI over the whole step's statistics. That extra pass is
run only when G > 1 and the MI coefficient is not 0 (docs/training.md quotes its cost). Head losses
that are means over images (classification, RetinaNet's per-image normalisation) average exactly; the
segmentation loss divides by each round's valid pixels and the load-balance loss is a product of
per-round means, so those two equal the big batch's only when the rounds are alike (docs/training.md).

MI across ranks: per MoE layer the statistics A[t, e] (router probability mass) are summed over all
ranks, value-wise, while the gradient flows through this rank's tokens only:
``A = A_local + (all_reduce_sum(A_local) - A_local)`` with the reduced part detached. The engine then
averages gradients over the world size W, so each rank's MI term is scaled by W: the update equals the
gradient of ``a_mi * MI(A_global)`` a single process would take on the global batch. The task marginal
is the schedule's real sampling ratio (``task_prior``), not this batch's token counts.

MI across steps: a step that trains only some tasks (per-dataset sampling) fills the other tasks' rows
of A from a running estimate, detached (moevit.train.task_expert_estimate); the trained tasks' routers
get the gradient of the full I(T; E). A step that trains every task uses its own rows only.

Every rank runs the same plan (same tasks, same order), so the all-to-alls inside MoE layers and the
two all-reduces here pair up on every rank.

Non-finite losses: the logged scalars are reduced over ranks before each round's backward, together with
a count of ranks whose objective is NaN or inf. If any rank has one, every rank skips that backward, the
step's remaining rounds and its optimizer step together, and drops the gradients of the rounds already
run (moevit.parallel.accumulation) (same answer from the same all-reduce, so replicas never diverge
and no collective is left unpaired); the step is counted, and `max_bad_steps` consecutive skipped steps
stop training with `NonFiniteLossError`. Tests inject such losses through moevit.faults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from moevit.config.schema import AuxLossConfig
from moevit.data.collate import move_batch
from moevit.data.multitask import StepPlan
from moevit.faults import injected_loss
from moevit.layers import load_balance_loss, mean_mutual_information_loss, router_z_loss, task_expert_matrices
from moevit.layers.router import Routing
from moevit.parallel.accumulation import discard_accumulated_gradients, mark_boundary
from moevit.parallel.collectives import all_reduce_sum, rank
from moevit.train import dropped_slots, expert_load
from moevit.train.errors import NonFiniteLossError
from moevit.train.task_expert_estimate import RunningTaskRows


@dataclass
class StepResult:
    """What one step measured; losses are means over ranks (identical on every rank)."""

    task_losses: dict[
        str, dict[str, float]
    ]  # task -> {"loss", head parts, "load_balance", "z_loss", "weight", "expert_load/<layer>"}
    mutual_information: float | None  # None: no MoE layer, or the MI coefficient is 0
    total: float  # the optimised objective (MI unscaled by the world size)
    images: int  # images of the step over all ranks
    expert_counts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> task -> (E,)
    skipped: bool = False  # some rank's objective was NaN or inf: no rank updated the weights
    skipped_steps: int = 0  # steps skipped so far in this run (resumed runs included)
    # The all-rank sums of the caller's `also_sum` (MultiTaskStep.__call__), reduced with the step's own
    # figures; empty when the caller passed none.
    also_summed: list[float] = field(default_factory=list)


def globally_summed(local: torch.Tensor) -> torch.Tensor:
    """The all-rank sum as value, with the gradient of `local` only (see "MI across ranks" above)."""
    return local + (all_reduce_sum(local) - local.detach())


class MultiTaskStep:
    """Runs one step on an engine with this interface (`engine(task, batch) -> TaskOutput`,
    `engine.backward(loss)`, `engine.step()`).

    Args:
        engine: the DeepSpeed engine (or any object with that interface).
        tasks: every task of the model, in config order (rows of the MI statistics).
        aux_loss: coefficients of the auxiliary MoE losses.
        task_prior: the real fraction of training samples per task (the schedule's expected ratios).
        world_size: ranks whose gradients the engine averages.
        device: where batches go.
        max_bad_steps: consecutive skipped (non-finite) steps that stop training; 0 never stops.
    """

    def __init__(
        self,
        engine,
        tasks: Sequence[str],
        aux_loss: AuxLossConfig,
        task_prior: Mapping[str, float],
        world_size: int,
        device: torch.device,
        max_bad_steps: int = 0,
    ):
        self.engine = engine
        self.tasks = list(tasks)
        self.aux_loss = aux_loss
        self.task_prior_T = torch.tensor([task_prior[task] for task in self.tasks], dtype=torch.float32)
        self.world_size = world_size
        self.device = device
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.task_expert_mass = RunningTaskRows(self.tasks, aux_loss.mutual_information_decay)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skipped": self.consecutive_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skipped = state["consecutive_skipped"]

    def __call__(
        self,
        plan: StepPlan,
        weights: Mapping[str, float],
        step: int | None = None,
        also_sum: torch.Tensor | None = None,
    ) -> StepResult:
        """Runs the step (its `plan.accumulation` micro-batch rounds); `step` (1-based) only serves fault
        injection (moevit.faults). `also_sum`: figures of the caller's (flat float64, on the device) that
        ride on the first round's all-reduce instead of a collective and host sync of their own; their
        all-rank sums come back as `result.also_summed`."""
        rounds = plan.rounds()
        others = self.other_rounds_statistics(rounds) if len(rounds) > 1 else [None]
        results: list[StepResult] = []
        step_matrices: list[torch.Tensor] | None = None
        counts: dict[str, dict[str, torch.Tensor]] = {}
        for index, micro_plan in enumerate(rounds):
            last = index == len(rounds) - 1
            # A fault strikes the last round: the earlier rounds' gradients are then in the engine.
            result, matrices, total = self.forward_round(
                micro_plan,
                weights,
                others[index],
                len(rounds),
                step if last else None,
                also_sum if index == 0 else None,
            )
            results.append(result)
            if result.skipped:
                if index > 0:
                    discard_accumulated_gradients(self.engine)
                break
            mark_boundary(self.engine, last)
            self.engine.backward(total)
            self.engine.step()
            if matrices is not None:
                step_matrices = (
                    matrices if step_matrices is None else [a + b for a, b in zip(step_matrices, matrices)]
                )
            for layer, round_counts in result.expert_counts.items():
                by_task = counts.setdefault(layer, {})
                for task, counts_E in round_counts.items():
                    by_task[task] = by_task[task] + counts_E if task in by_task else counts_E
        also_summed = results[0].also_summed
        result = combine_rounds(results)
        result.also_summed = also_summed
        if result.skipped:
            self.record_skipped(step)
        else:
            self.consecutive_skipped = 0
            if step_matrices is not None:  # a skipped step's statistics may hold the NaN: not kept
                self.task_expert_mass.update(step_matrices, plan.tasks)
        result.expert_counts = counts
        result.skipped_steps = self.skipped_steps
        for task in plan.tasks:
            result.task_losses[task]["weight"] = weights[task]
        return result

    def forward_round(
        self,
        plan: StepPlan,
        weights: Mapping[str, float],
        other_rounds: list[torch.Tensor] | None,
        num_rounds: int,
        step: int | None,
        also_sum: torch.Tensor | None = None,
    ) -> tuple[StepResult, list[torch.Tensor] | None, torch.Tensor]:
        """One micro-batch round's forwards and objective (before DeepSpeed divides it by `num_rounds`),
        its logged scalars reduced over ranks (with `also_sum`, see __call__), its all-rank task-expert
        matrices (detached)."""
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
        mutual_information, matrices = self.mutual_information(routing_by_task, other_rounds)
        total = task_total
        if mutual_information is not None:
            # MI is one term of the step, not a mean over rounds: undo the engine's 1/num_rounds.
            scale = self.world_size * num_rounds
            total = total + self.aux_loss.mutual_information * scale * mutual_information
        injected = injected_loss(rank(), step) if step is not None else None
        if injected is not None:
            total = total + injected
        counts = expert_load.local_counts(routing_by_task, self.device)
        drops = dropped_slots.local_drops(routing_by_task, self.device)
        extra = also_sum if also_sum is not None else counts.new_zeros(0, dtype=torch.float64)
        result, summed = self.reduce_over_ranks(
            parts, task_total, mutual_information, images, total, torch.cat([counts.double(), drops, extra])
        )
        summed, result.also_summed = (
            summed[: len(summed) - extra.numel()],
            summed[len(summed) - extra.numel() :],
        )
        # The reduce has synchronised with the device: the local counts come to the host in one copy here,
        # not one per layer and task after the backward (which made the host wait for the backward).
        result.expert_counts = expert_load.counts_by_layer(routing_by_task, counts.cpu())
        summed_counts, summed_drops = summed[: counts.numel()], summed[counts.numel() :]
        # Logged with the task's losses: dropped slots (capacity bound only) and each layer's load.
        for task, values in dropped_slots.dropped_metrics(routing_by_task, summed_drops).items():
            result.task_losses[task].update(values)
        for task, values in expert_load.load_ratios(routing_by_task, summed_counts).items():
            result.task_losses[task].update(values)
        return result, matrices, total

    @torch.no_grad()
    def other_rounds_statistics(self, rounds: list[StepPlan]) -> list[list[torch.Tensor] | None]:
        """Exact MI under accumulation: a no-grad forward of every round first, giving each round's
        all-rank task-expert matrices; round r's MI then sees its own rows (with gradient) plus the sum
        of the other rounds' rows (detached), i.e. the whole step's statistics, and the rounds' gradients
        add up to the gradient of MI over the whole step. Costs one forward of the step without graph."""
        if self.aux_loss.mutual_information == 0:
            return [None] * len(rounds)
        per_round = []
        # The pass draws from a fork of the RNG streams: the forwards with gradient then draw the same
        # dropout / drop-path masks as this pass did (same order of draws), so these statistics are
        # theirs, and the run's random stream does not depend on whether MI is on.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for plan in rounds:
                routing_by_task = {
                    task: self.engine(task, move_batch(batch, self.device)).routing for task, batch in plan
                }
                if not any(routing_by_task.values()):
                    return [None] * len(rounds)
                per_round.append(self.all_rank_matrices(routing_by_task))
        total = [sum(layer) for layer in zip(*per_round)]
        return [[t - own for t, own in zip(total, matrices)] for matrices in per_round]

    def all_rank_matrices(self, routing_by_task: dict[str, dict[str, Routing]]) -> list[torch.Tensor]:
        """Per MoE layer, the (tasks, experts) router mass summed over ranks (gradient: this rank's)."""
        matrices = task_expert_matrices(
            {task: list(routing.values()) for task, routing in routing_by_task.items()}, self.tasks
        )
        # One collective for all layers: flatten, reduce, split back.
        flat = globally_summed(torch.cat([m.flatten() for m in matrices]))
        return [chunk.view_as(m) for chunk, m in zip(flat.split([m.numel() for m in matrices]), matrices)]

    def record_skipped(self, step: int | None) -> None:
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        if self.max_bad_steps and self.consecutive_skipped >= self.max_bad_steps:
            where = f" (the last at step {step})" if step is not None else ""
            raise NonFiniteLossError(
                f"training stopped: the loss was NaN or inf on some rank in {self.consecutive_skipped} "
                f"consecutive steps{where}, each skipped; train.max_bad_steps={self.max_bad_steps}. "
                "Lower train.optim.lr, check the data, or resume from an earlier checkpoint."
            )

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

    def mutual_information(
        self,
        routing_by_task: dict[str, dict[str, Routing]],
        other_rounds: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """MI of the all-rank task-expert statistics, averaged over MoE layers, with the other
        accumulation rounds' rows added (detached) and the rows of tasks this step did not train taken
        from the running estimate; and this round's all-rank matrices (detached), which update that
        estimate once the step is known to be finite."""
        if self.aux_loss.mutual_information == 0 or not any(routing_by_task.values()):
            return None, None
        matrices = self.all_rank_matrices(routing_by_task)
        step_matrices = matrices
        if other_rounds is not None:
            step_matrices = [own + other.detach() for own, other in zip(matrices, other_rounds)]
        completed = self.task_expert_mass.complete(step_matrices, routing_by_task.keys())
        loss = mean_mutual_information_loss(completed, self.task_prior_T.to(matrices[0].device))
        return loss, [m.detach() for m in matrices]

    def reduce_over_ranks(
        self,
        parts: dict[str, dict[str, torch.Tensor]],
        task_total: torch.Tensor,
        mutual_information: torch.Tensor | None,
        images: int,
        objective: torch.Tensor,
        sums: torch.Tensor,
    ) -> tuple[StepResult, list[float]]:
        """Means over ranks of every logged scalar, whether any rank's `objective` is not finite, and the
        sums over ranks of `sums` (flat float64: routing statistics), in one all-reduce (on the device: NCCL
        needs it) and one host sync."""
        names = [(task, name) for task, named in parts.items() for name in named]
        values = [parts[task][name].detach().reshape(()) for task, name in names]
        nonfinite = (~torch.isfinite(objective.detach())).to(self.device, torch.float64).reshape(())
        values += [task_total.detach(), torch.tensor(float(images), device=self.device), nonfinite]
        if mutual_information is not None:
            values.append(mutual_information.detach())
        summed = all_reduce_sum(torch.cat([torch.stack([v.double() for v in values]), sums])).tolist()
        summed, summed_extra = summed[: len(values)], summed[len(values) :]
        means = [value / self.world_size for value in summed]
        task_losses: dict[str, dict[str, float]] = {task: {} for task in parts}
        for (task, name), value in zip(names, means):
            task_losses[task][name] = value
        mi_value = means[len(names) + 3] if mutual_information is not None else None
        total = means[len(names)] + (
            self.aux_loss.mutual_information * mi_value if mi_value is not None else 0.0
        )
        skipped = summed[len(names) + 2] > 0  # ranks with a non-finite objective
        result = StepResult(
            task_losses, mi_value, total, images=round(summed[len(names) + 1]), skipped=skipped
        )
        return result, summed_extra


def combine_rounds(results: list[StepResult]) -> StepResult:
    """The step's figures from its rounds' (each already a mean over ranks): losses and MI are means
    over the rounds run (what the engine's 1/num_rounds scaling optimises), images their sum."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    task_losses = {
        task: {name: sum(r.task_losses[task][name] for r in results) / len(results) for name in named}
        for task, named in first.task_losses.items()
    }
    mi = (
        None
        if first.mutual_information is None
        else sum(r.mutual_information for r in results) / len(results)
    )
    total = sum(r.total for r in results) / len(results)
    images = sum(r.images for r in results)
    return StepResult(task_losses, mi, total, images, skipped=any(r.skipped for r in results))
