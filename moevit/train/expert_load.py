"""Each MoE layer's busiest/mean expert load per task, over all ranks, for metrics.jsonl.

A step routes each task's micro-batch through every MoE layer once; the tokens an expert receives in that
pass (from every rank, under expert parallelism) are what its memory must hold. So the figure is computed
from the counts summed over ranks: the (tasks x layers x E) counts ride on the step's one all-reduce of
its logged scalars (`MultiTaskStep.reduce_over_ranks`), so they cost no collective and no host sync of
their own. Every rank lays the counts out in the same order (same plan, same layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moevit.layers.router import Routing, busiest_over_mean

KEY_PREFIX = "expert_load/"  # metrics key: expert_load/<layer>, e.g. expert_load/blocks.1.mlp

RoutingByTask = Mapping[str, Mapping[str, Routing]]


def local_counts(routing_by_task: RoutingByTask, device: torch.device) -> torch.Tensor:
    """This rank's routed slots per expert of every (task, layer), concatenated in `routing_by_task`'s
    order, as float64 (exact for any count a step can reach) on `device`: what the ranks sum."""
    counts = [
        r.counts_E.detach().reshape(-1) for routing in routing_by_task.values() for r in routing.values()
    ]
    if not counts:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat(counts).to(device, torch.float64)


def load_ratios(routing_by_task: RoutingByTask, summed_counts: list[float]) -> dict[str, dict[str, float]]:
    """task -> {"expert_load/<layer>": busiest/mean load of that layer's experts}, from `local_counts`
    summed over ranks."""
    ratios: dict[str, dict[str, float]] = {task: {} for task in routing_by_task}
    start = 0
    for task, routing in routing_by_task.items():
        for layer, r in routing.items():
            counts_E = torch.tensor(summed_counts[start : start + r.counts_E.numel()], dtype=torch.float64)
            start += r.counts_E.numel()
            ratios[task][KEY_PREFIX + layer] = busiest_over_mean(counts_E, r.num_routable)
    return ratios
