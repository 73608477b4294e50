"""The MoE MLP: task router + sorted dispatch + grouped experts -> (output, routing).

A drop-in for a ViT block's MLP that also takes the task name. Single-device code: expert
parallelism (moevit.parallel) swaps `self.experts` for a module with the same call signature
that exchanges the sorted rows between ranks, so nothing here knows about process groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from moevit.layers.capacity import check_capacity_factor, expert_capacity, slots_within_capacity
from moevit.layers.dispatch import combine, dispatch, plan_dispatch
from moevit.layers.experts import DEFAULT_EXPERT_IMPL, GroupedExperts
from moevit.layers.router import DEFAULT_GATE_INIT_STD, Routing, TaskRouter


class MoEMlp(nn.Module):
    """Top-k mixture of MLP experts with one router per task; dropless unless `capacity_factor` is set.

    Args:
        dim: token width (D).
        expert_hidden: hidden width of each expert (H).
        num_experts: experts shared by all tasks (E).
        top_k: experts per token (K).
        tasks: task names; each gets a router.
        act_layer: expert activation.
        bias: expert linear biases.
        task_experts: task -> n: that task routes among experts 0..n-1 only (continual learning; see
            moevit.layers.router); other tasks route among all E.
        capacity_factor: None: dropless. Else each expert takes at most
            ceil(capacity_factor * T * K / n) of a forward's rows (T local tokens, n experts the task
            routes among); the rest are dropped as moevit.layers.capacity describes.
        gate_init_std, router_jitter: the router's gate initialisation and training-only input jitter
            (moevit.layers.router).
        expert_impl: how the experts' matmuls run, "loop", "grouped" or "auto" (moevit.layers.experts).
    """

    routes_tasks = True  # forward takes (x, task) and returns (y, Routing)

    def __init__(
        self,
        dim: int,
        expert_hidden: int,
        num_experts: int,
        top_k: int,
        tasks: Sequence[str],
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        task_experts: Mapping[str, int] | None = None,
        capacity_factor: float | None = None,
        gate_init_std: float = DEFAULT_GATE_INIT_STD,
        router_jitter: float = 0.0,
        expert_impl: str = DEFAULT_EXPERT_IMPL,
    ):
        super().__init__()
        check_capacity_factor(capacity_factor)
        self.capacity_factor = capacity_factor
        self.router = TaskRouter(dim, num_experts, top_k, tasks, task_experts, gate_init_std, router_jitter)
        self.experts = GroupedExperts(num_experts, dim, expert_hidden, act_layer, bias, expert_impl)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, Routing]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, task)
        kept_slots = None
        # Not under torch.jit.trace (fvcore's flop counter, moevit.models.flops): FLOPs count the dropless
        # rows, the most a bounded layer computes.
        bounded = self.capacity_factor is not None and not torch.jit.is_tracing()
        if bounded:
            capacity = expert_capacity(
                routing.expert_idx_TK.numel(), routing.num_routable, self.capacity_factor
            )
            # The common case, no expert over capacity, skips the priority sorts (the dropless plan it
            # would give anyway); the read syncs with the device, as the experts' row counts do.
            if int(routing.counts_E.max()) > capacity:
                kept_slots = slots_within_capacity(
                    routing.expert_idx_TK, routing.weights_TK, self.num_experts, capacity
                )
        # Only kept rows reach the experts, so under expert parallelism only they are exchanged.
        plan = plan_dispatch(routing.expert_idx_TK, self.num_experts, kept_slots)
        y_SD = self.experts(dispatch(x_TD, plan), plan.counts_E)
        y_TD = combine(y_SD, routing.weights_TK, plan)
        if bounded:
            routing = replace(routing, dropped_slots=plan.num_dropped)
        return y_TD.view(x.shape), routing

    def extra_repr(self) -> str:
        return "" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
