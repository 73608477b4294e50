"""The MoE MLP: task router + sorted dispatch + grouped experts -> (output, routing).

A drop-in for a ViT block's MLP that also takes the task name. Single-device code: expert
parallelism (moevit.parallel) swaps `self.experts` for a module with the same call signature
that exchanges the sorted rows between ranks, so nothing here knows about process groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moevit.layers.dispatch import combine, dispatch, plan_dispatch
from moevit.layers.experts import GroupedExperts
from moevit.layers.router import DEFAULT_GATE_INIT_STD, Routing, TaskRouter


class MoEMlp(nn.Module):
    """Dropless top-k mixture of MLP experts with one router per task.

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
        gate_init_std, router_jitter: the router's gate initialisation and training-only input jitter
            (moevit.layers.router).
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
        gate_init_std: float = DEFAULT_GATE_INIT_STD,
        router_jitter: float = 0.0,
    ):
        super().__init__()
        self.router = TaskRouter(dim, num_experts, top_k, tasks, task_experts, gate_init_std, router_jitter)
        self.experts = GroupedExperts(num_experts, dim, expert_hidden, act_layer, bias)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, Routing]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, task)
        plan = plan_dispatch(routing.expert_idx_TK, self.num_experts)
        y_SD = self.experts(dispatch(x_TD, plan), plan.counts_E)
        y_TD = combine(y_SD, routing.weights_TK, plan)
        return y_TD.view(x.shape), routing
