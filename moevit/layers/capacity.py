"""The optional expert capacity bound: which (token, slot) rows an MoE layer keeps.

With `capacity_factor` c, every expert of a layer takes at most

    capacity = ceil(c * T * K / n)

rows per forward pass, where T is the number of tokens of that forward on this device, K the
slots per token and n the experts the task can route to: c times the expert's even share of the
slots. The count is over the local tokens, as in GShard and Switch (a "group" is one device's
batch): the bound needs no collective, and under expert parallelism a rank owning L experts
receives at most L * capacity rows from each rank (moevit.parallel.expert_parallel ships only kept
rows). Model code stays single-device.

Which rows an over-full expert keeps (deterministic, no randomness): all first choices before any
second choice, and within one slot rank the rows with the larger gate weight first, ties by token
order. This is V-MoE's batch prioritized routing (Riquelme et al. 2021) with the slot's own weight as
its priority, rather than GShard/Switch's plain token order. Why: a ViT batch is images one after the
other, each a raster of patches, so token order would drop the last images of the batch wholesale and
the bottom of every image first; priority by weight drops the rows that carry the least of their
token's output (V-MoE measured it far better at capacity below 1).

A dropped row contributes nothing: its token keeps the gate-weighted outputs of its other, kept
experts (weights not renormalised, as in GShard), and a token with every slot dropped gets a zero
MoE output, so it passes through the block's residual unchanged. The router's probabilities and
choices (`Routing.probs_sum_E`, `counts_E`) are the router's, before any drop, so the auxiliary
losses see the same values as without the bound.
"""

from __future__ import annotations

import math

import torch


def check_capacity_factor(capacity_factor: float | None) -> None:
    """None (dropless) or a finite number > 0; else a one-line error."""
    if capacity_factor is None:
        return
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise ValueError(f"capacity_factor must be a number > 0 or None (dropless), got {capacity_factor!r}")
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be > 0 (or None: dropless), got {capacity_factor}")


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * num_slots / num_experts): the rows one expert may take.

    Rounded to 6 decimals before the ceiling, so that float error (0.1 * 30 / 3 = 1.0000000000000002)
    does not add a row to an exact share.
    """
    return math.ceil(round(capacity_factor * num_slots / num_experts, 6))


@torch.no_grad()
def slots_within_capacity(
    expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Flat indices (t * K + k, ascending) of the slots kept when each expert takes at most `capacity`.

    Priority within an expert (see the module docstring): slot rank k first, then gate weight
    (descending), then token order.
    """
    num_tokens, top_k = expert_idx_TK.shape
    num_slots = num_tokens * top_k
    device = expert_idx_TK.device
    flat_expert_S = expert_idx_TK.reshape(-1)
    slot_rank_S = torch.arange(num_slots, device=device) % top_k
    # Rank of every slot by weight, descending; the stable sort keeps equal weights in token order.
    by_weight_S = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    weight_rank_S = torch.empty_like(by_weight_S)
    weight_rank_S[by_weight_S] = torch.arange(num_slots, device=device)
    # One sort on a unique key: grouped by expert, then slot rank, then weight rank.
    key_S = (flat_expert_S * top_k + slot_rank_S) * num_slots + weight_rank_S
    order_S = torch.argsort(key_S)
    counts_E = torch.bincount(flat_expert_S, minlength=num_experts)
    first_row_E = torch.cumsum(counts_E, 0) - counts_E
    position_in_expert_S = torch.arange(num_slots, device=device) - first_row_E[flat_expert_S[order_S]]
    kept_S = torch.empty(num_slots, dtype=torch.bool, device=device)
    kept_S[order_S] = position_in_expert_S < capacity
    return kept_S.nonzero().squeeze(1)
