"""Slots dropped by the expert capacity bound (model.moe.capacity_factor), per task and MoE layer, for metrics.jsonl.

Each task's micro-batch passes every MoE layer once per step; a bounded layer reports how many of its
slots were over capacity (`Routing.dropped_slots`, moevit.layers.capacity). The figures are summed over
ranks (under expert parallelism each rank drops its own overflow before the exchange) on the step's one
all-reduce of its logged scalars (`MultiTaskStep.reduce_over_ranks`), per micro-batch round (under
gradient accumulation a step logs the mean over its rounds, as its losses). Every rank builds the same
model and runs the same plan, so every rank lays out the same bounded layers in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moevit.layers.router import Routing

FRACTION_PREFIX = (
    "dropped_fraction/"  # metrics key: dropped_fraction/<layer>, e.g. dropped_fraction/blocks.1.mlp
)
COUNT_KEY = "dropped_slots"  # all of the task's bounded layers together

RoutingByTask = Mapping[str, Mapping[str, Routing]]


def _bounded(routing_by_task: RoutingByTask):
    for task, routing in routing_by_task.items():
        for layer, r in routing.items():
            if r.dropped_slots is not None:
                yield task, layer, r


def local_drops(routing_by_task: RoutingByTask, device: torch.device) -> torch.Tensor:
    """(dropped, routed) slots of every bounded layer of every task, flattened, float64 on `device`: what
    the ranks sum. Empty when no layer is bounded."""
    pairs = [[r.dropped_slots, r.expert_idx_TK.numel()] for _, _, r in _bounded(routing_by_task)]
    return torch.tensor(pairs, dtype=torch.float64, device=device).reshape(-1)


def dropped_metrics(routing_by_task: RoutingByTask, summed_drops: list[float]) -> dict[str, dict[str, float]]:
    """task -> {"dropped_slots": slots dropped in all bounded layers, "dropped_fraction/<layer>": that
    layer's dropped over routed slots}, from `local_drops` summed over ranks; {} when no layer is bounded."""
    out: dict[str, dict[str, float]] = {}
    for i, (task, layer, _) in enumerate(_bounded(routing_by_task)):
        dropped, routed = summed_drops[2 * i], summed_drops[2 * i + 1]
        values = out.setdefault(task, {COUNT_KEY: 0})
        values[COUNT_KEY] += round(dropped)
        values[FRACTION_PREFIX + layer] = dropped / max(routed, 1.0)
    return out
