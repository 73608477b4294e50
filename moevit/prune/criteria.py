"""Which experts each MoE layer keeps, from per-task usage: the pruning criteria.

Every criterion maps usage ({layer: {task: slots per expert}}) to a plan ({layer: sorted kept ids}).
Each task is judged on its own share of routed slots (its counts / its total in that layer); with
several tasks the plan keeps the union (per-layer criteria) or ranks experts by the mean of the tasks'
shares (budgets).

- threshold t (Mod-Squad): keep expert e if its share, in percent, exceeds t / K (K = top_k);
  when fewer than K experts pass, keep the K most used instead. t = 0 keeps every expert any
  calibration token selected, which leaves the outputs on that data bit-identical.
- mass p: the fewest most-used experts whose shares add up to at least p (0 < p <= 1).
- top m: the m most used experts per layer.
- budget on parameters or GFLOPs: per-layer subsets with the most routing mass (sum over layers of
  the kept shares) whose cost fits: start from each layer's most used expert, then add, greedily, the
  expert with the largest share per unit of added cost that still fits. Parameter costs per expert
  are equal across layers of one width, so there the greedy choice is optimal.

A layer keeping fewer than K experts runs top-min(K, n) routing; one keeping one expert becomes a
plain MLP (moevit.models.moe_vit). Ties in usage go to the lower expert id.

A task restricted to the first n experts of a layer (trained before a continual expansion) is judged
on those n only: "keep all" keeps the experts it can reach, not the ones added for a later task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from moevit.artifacts.usage import Usage

Plan = dict[str, list[int]]


@dataclass(frozen=True)
class Criterion:
    """kind: "threshold" | "mass" | "top" | "params" | "gflops" | "all"; value: its number."""

    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        return {
            "threshold": f"threshold {self.value:g}",
            "mass": f"mass {self.value:g}",
            "top": f"top {int(self.value)}",
            "params": f"budget {self.value:g} params",
            "gflops": f"budget {self.value:g} GFLOPs",
            "all": "keep all",
        }[self.kind]

    def validate(self) -> None:
        if self.kind not in ("threshold", "mass", "top", "params", "gflops", "all"):
            raise ValueError(f"unknown pruning criterion {self.kind!r}")
        if self.kind == "threshold" and self.value < 0:
            raise ValueError(f"--threshold must be >= 0, got {self.value:g}")
        if self.kind == "mass" and not 0 < self.value <= 1:
            raise ValueError(f"--mass must be in (0, 1], got {self.value:g}")
        if self.kind == "top" and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"--top must be a whole number >= 1, got {self.value:g}")
        if self.kind in ("params", "gflops") and self.value <= 0:
            raise ValueError(f"--budget-{self.kind} must be > 0, got {self.value:g}")


def task_shares(usage: Usage, tasks: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """{layer: {task: share of the task's slots per expert}}; a task without slots in a layer is an error."""
    shares: dict[str, dict[str, list[float]]] = {}
    for layer, by_task in usage.items():
        shares[layer] = {}
        for task in tasks:
            counts = by_task.get(task)
            if counts is None or sum(counts) == 0:
                raise ValueError(
                    f"no usage of task {task!r} in {layer}: run a calibration pass (--calib-batches N) "
                    "or pick a checkpoint whose run recorded this task"
                )
            total = sum(counts)
            shares[layer][task] = [c / total for c in counts]
    return shares


def _ranked(shares: Sequence[float]) -> list[int]:
    """Expert ids from most to least used; ties to the lower id."""
    return sorted(range(len(shares)), key=lambda e: (-shares[e], e))


def _per_task(shares: list[float], criterion: Criterion, top_k: int) -> set[int]:
    ranked = _ranked(shares)
    if criterion.kind == "all":
        return set(ranked)
    if criterion.kind == "threshold":
        kept = {e for e, s in enumerate(shares) if 100 * s > criterion.value / top_k}
        return kept if len(kept) >= top_k else set(ranked[:top_k])
    if criterion.kind == "mass":
        kept, mass = set(), 0.0
        for e in ranked:
            kept.add(e)
            mass += shares[e]
            if mass >= criterion.value - 1e-12:
                break
        return kept
    if criterion.kind == "top":
        return set(ranked[: int(criterion.value)])
    raise ValueError(f"{criterion} is not a per-layer criterion")


def select_experts(
    usage: Usage,
    tasks: Sequence[str],
    top_k: Mapping[str, int],
    criterion: Criterion,
    cost: Callable[[Mapping[str, int]], float] | None = None,
    routable: Mapping[str, Mapping[str, int]] | None = None,
) -> Plan:
    """The plan of `criterion` for `tasks`.

    Args:
        usage: counts per layer, task and expert (usage.py).
        tasks: the tasks the pruned model serves.
        top_k: layer -> its routing top-k.
        criterion: what to keep.
        cost: for budgets, the cost (parameters or GFLOPs) of a plan given as {layer: kept count}.
        routable: layer -> task -> n for tasks that route among the first n experts only.
    """
    criterion.validate()
    shares = task_shares(usage, tasks)
    if criterion.kind in ("params", "gflops"):
        if cost is None:
            raise ValueError(f"{criterion} needs a cost function")
        return _within_budget(shares, tasks, criterion.value, cost, str(criterion))
    plan: Plan = {}
    for layer, by_task in shares.items():
        kept: set[int] = set()
        for task in tasks:
            reachable = (routable or {}).get(layer, {}).get(task, len(by_task[task]))
            kept |= _per_task(by_task[task][:reachable], criterion, min(top_k[layer], reachable))
        plan[layer] = sorted(kept)
    return plan


def _within_budget(
    shares: dict[str, dict[str, list[float]]],
    tasks: Sequence[str],
    budget: float,
    cost: Callable[[Mapping[str, int]], float],
    name: str,
) -> Plan:
    mean = {
        layer: [sum(by_task[t][e] for t in tasks) / len(tasks) for e in range(len(by_task[tasks[0]]))]
        for layer, by_task in shares.items()
    }
    order = {layer: _ranked(values) for layer, values in mean.items()}
    counts = {layer: 1 for layer in mean}
    current = cost(counts)
    if current > budget:
        raise ValueError(f"{name} is below the smallest pruned model (one expert per layer): {current:.6g}")
    while True:
        best = None
        for layer, n in counts.items():
            if n == len(order[layer]):
                continue
            trial = cost({**counts, layer: n + 1})
            if trial > budget:
                continue
            gain = mean[layer][order[layer][n]]
            added = max(trial - current, 0.0)
            score = (float("inf") if added == 0 else gain / added, gain)
            if best is None or score > best[0]:
                best = (score, layer, trial)
        if best is None:
            break
        _, layer, current = best
        counts[layer] += 1
    return {layer: sorted(order[layer][: counts[layer]]) for layer in mean}
