"""Which transformer blocks are MoE: configuration, not code (V-MoE's habit).

Forms accepted (`model.moe.layers`):
  "every:N"  every N-th block, counted so that the last block is MoE when N divides depth
             (V-MoE's "every other layer" is every:2 -> blocks 1, 3, 5, ...)
  "last:N"   the last N blocks
  "all" / "none"
  [i, j, ...] explicit block indices (negative indices count from the end)
"""

from __future__ import annotations

from collections.abc import Sequence


def resolve_moe_layers(spec: str | Sequence[int], depth: int) -> list[int]:
    """Turn a placement spec into sorted block indices in [0, depth)."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(depth))
        if text == "none":
            return []
        kind, _, number = text.partition(":")
        if kind in ("every", "last") and number.isdigit() and int(number) > 0:
            n = int(number)
            if kind == "every":
                return [i for i in range(depth) if (i + 1) % n == 0]
            if n > depth:
                raise ValueError(f"moe layers 'last:{n}' asks for more blocks than depth={depth}")
            return list(range(depth - n, depth))
        raise ValueError(
            f"moe layers spec {spec!r} not understood; use 'every:N', 'last:N', 'all', 'none' or a list of block indices"
        )
    indices = []
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"moe layer index {i!r} out of range for depth={depth}")
        indices.append(i % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe layer indices repeat: {list(spec)}")
    return sorted(indices)
