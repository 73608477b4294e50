"""Each MoE layer's busiest/mean expert load per task, over all ranks, for metrics.jsonl.

A step routes each task's micro-batch through every MoE layer once; the tokens an expert receives in that
pass (from every rank, under expert parallelism) are what its memory must hold. So the figure is computed
from the counts summed over ranks: one all-reduce per step of (tasks x layers x E) integers, tiny next to
the step's all-to-alls. Every rank calls it at the same point of the step (same plan, same layers), so
the collective pairs up.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moevit.layers.router import Routing, busiest_over_mean
from moevit.parallel.collectives import all_reduce_sum

KEY_PREFIX = "expert_load/"  # metrics key: expert_load/<layer>, e.g. expert_load/blocks.1.mlp


def expert_load_ratios(routing_by_task: Mapping[str, Mapping[str, Routing]]) -> dict[str, dict[str, float]]:
    """task -> {"expert_load/<layer>": busiest/mean load of that layer's experts over all ranks}."""
    entries = [(task, layer, r) for task, routing in routing_by_task.items() for layer, r in routing.items()]
    if not entries:
        return {task: {} for task in routing_by_task}
    local = torch.cat([r.counts_E.detach().reshape(-1) for _, _, r in entries])
    summed = all_reduce_sum(local).cpu().split([r.counts_E.numel() for _, _, r in entries])
    ratios: dict[str, dict[str, float]] = {task: {} for task in routing_by_task}
    for (task, layer, routing), counts_E in zip(entries, summed):
        ratios[task][KEY_PREFIX + layer] = busiest_over_mean(counts_E, routing.num_routable)
    return ratios
