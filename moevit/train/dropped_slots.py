"""Slots dropped by the expert capacity bound (model.moe.capacity_factor), per task and MoE layer, for metrics.jsonl.

Each task's micro-batch passes every MoE layer once per step; a bounded layer reports how many of its
slots were over capacity (`Routing.dropped_slots`, moevit.layers.capacity). The figures are summed over
ranks (under expert parallelism each rank drops its own overflow before the exchange) in one all-reduce,
per micro-batch round (under gradient accumulation a step logs the mean over its rounds, as its losses),
made only when some layer has a bound: every rank builds the same model and runs the same plan, so all
ranks call it or none, at the same point of the step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moevit.layers.router import Routing
from moevit.parallel.collectives import all_reduce_sum

FRACTION_PREFIX = (
    "dropped_fraction/"  # metrics key: dropped_fraction/<layer>, e.g. dropped_fraction/blocks.1.mlp
)
COUNT_KEY = "dropped_slots"  # all of the task's bounded layers together


def dropped_slots_over_ranks(
    routing_by_task: Mapping[str, Mapping[str, Routing]], device: torch.device
) -> dict[str, dict[str, float]]:
    """task -> {"dropped_slots": slots dropped in all bounded layers, "dropped_fraction/<layer>": that
    layer's dropped over routed slots}, over all ranks; {} when no layer is bounded."""
    entries = [
        (task, layer, r)
        for task, routing in routing_by_task.items()
        for layer, r in routing.items()
        if r.dropped_slots is not None
    ]
    if not entries:
        return {}
    local = [[r.dropped_slots, r.expert_idx_TK.numel()] for _, _, r in entries]
    summed = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()
    out: dict[str, dict[str, float]] = {}
    for (task, layer, _), (dropped, routed) in zip(entries, summed):
        values = out.setdefault(task, {COUNT_KEY: 0})
        values[COUNT_KEY] += round(dropped)
        values[FRACTION_PREFIX + layer] = dropped / max(routed, 1.0)
    return out
