"""Each MoE block's shape, resolved once from MoEViT's arguments.

A trained model gives every MoE block the same `num_experts` and `top_k`. Pruned models (moevit.prune)
give `num_experts` per block, and continually expanded ones (moevit.continual) restrict old tasks to
their first n experts, for all blocks or per block. `moe_mlp_specs` turns any of these forms into one
explicit `MoEMlpSpec` per MoE block, so the model's constructor builds blocks from plain settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoEMlpSpec:
    """One MoE block's MLP.

    num_experts: experts of the block (E).
    top_k: experts per token (at most E).
    task_experts: task -> n for the tasks that route among experts 0..n-1 only.
    plain: a pruned block that kept one expert: a plain MLP (top-1 routing over one expert gives it
        weight 1, the same function without a router).
    """

    num_experts: int
    top_k: int
    task_experts: dict[str, int] = field(default_factory=dict)
    plain: bool = False


def moe_mlp_specs(
    moe_layers: Sequence[int],
    num_experts: int | Mapping[int, int],
    top_k: int,
    tasks: Sequence[str],
    task_experts: Mapping[str, int | Mapping[int, int]] | None = None,
) -> dict[int, MoEMlpSpec]:
    """{block index: spec} for every MoE block.

    Args:
        moe_layers: the MoE block indices, sorted.
        num_experts: E for every block, or {block: E} naming exactly the MoE blocks (pruned models:
            top_k is clamped to each block's E, and E = 1 gives a plain MLP).
        top_k: experts per token.
        tasks: the model's tasks.
        task_experts: task -> n for every block, or task -> {block: n} for some blocks.
    """
    per_block = isinstance(num_experts, Mapping)
    experts = _experts_per_block(num_experts, list(moe_layers))
    restrictions = _restrictions(task_experts or {}, tasks, moe_layers)
    specs = {}
    for block, count in experts.items():
        restricted = {
            task: n if isinstance(n, int) else n[block]
            for task, n in restrictions.items()
            if isinstance(n, int) or block in n
        }
        specs[block] = MoEMlpSpec(
            num_experts=count,
            top_k=min(top_k, count) if per_block else top_k,
            task_experts=restricted,
            plain=per_block and count == 1,
        )
    return specs


def _experts_per_block(num_experts: int | Mapping[int, int], moe_layers: list[int]) -> dict[int, int]:
    if not isinstance(num_experts, Mapping):
        return {i: num_experts for i in moe_layers}
    per_block = {int(i): int(e) for i, e in num_experts.items()}
    if sorted(per_block) != moe_layers:
        raise ValueError(f"num_experts names blocks {sorted(per_block)}, but the MoE blocks are {moe_layers}")
    bad = {i: e for i, e in per_block.items() if e < 1}
    if bad:
        raise ValueError(f"num_experts per block must be >= 1, got {bad}")
    return per_block


def _restrictions(
    task_experts: Mapping[str, int | Mapping[int, int]], tasks: Sequence[str], moe_layers: Sequence[int]
) -> dict[str, int | dict[int, int]]:
    restrictions = {
        task: {int(i): int(n) for i, n in v.items()} if isinstance(v, Mapping) else int(v)
        for task, v in task_experts.items()
    }
    unknown = sorted(set(restrictions) - set(tasks))
    if unknown:
        raise ValueError(f"task_experts names {unknown}, which are not tasks of the model ({list(tasks)})")
    for task, per_block in restrictions.items():
        if isinstance(per_block, dict) and not set(per_block) <= set(moe_layers):
            raise ValueError(
                f"task_experts[{task!r}] names blocks {sorted(per_block)}; the MoE blocks are {list(moe_layers)}"
            )
    return restrictions
