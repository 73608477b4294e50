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
    order, int64 on `device`: what the ranks sum (as float64, beside the step's other scalars) and what
    the usage counters add up (`counts_by_layer`)."""
    counts = [
        r.counts_E.detach().reshape(-1) for routing in routing_by_task.values() for r in routing.values()
    ]
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(counts).to(device)


def counts_by_layer(routing_by_task: RoutingByTask, flat: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """`local_counts`' flat tensor as layer -> task -> (E,) counts, layers in forward order (every task
    of a step passes the same layers)."""
    pieces = iter(
        flat.split([r.counts_E.numel() for routing in routing_by_task.values() for r in routing.values()])
    )
    by_task = {task: {layer: next(pieces) for layer in routing} for task, routing in routing_by_task.items()}
    layers = next(iter(routing_by_task.values()), {})
    return {layer: {task: by_task[task][layer] for task in routing_by_task} for layer in layers}


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
