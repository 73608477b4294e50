"""Dropless token dispatch and combine for top-k MoE layers, by sorting.

Every (token, slot) pair is one row of work. Sorting the T*K rows by expert id makes each
expert's rows contiguous, so experts run as a grouped matmul over `counts_E` row blocks; no
capacity factor, no dropped token (MegaBlocks, Gale et al. 2023, make the same choice). The
combine un-sorts and takes the gate-weighted sum over the K slots of each token.

The sorted layout is also what expert parallelism exchanges: the blocks for the experts of
rank r are contiguous, so one `all_to_all_single` with split sizes moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each (token, slot) row goes. S = T * K rows."""

    sort_order_S: torch.Tensor  # row r of the sorted buffer is flat slot sort_order_S[r]
    token_of_row_S: torch.Tensor  # token feeding sorted row r
    counts_E: torch.Tensor  # rows per expert, in expert order (int64)
    num_tokens: int
    top_k: int


def plan_dispatch(expert_idx_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    num_tokens, top_k = expert_idx_TK.shape
    flat_expert_S = expert_idx_TK.reshape(-1)
    # stable: rows of one expert keep token order, so results do not depend on sort internals.
    sort_order_S = torch.argsort(flat_expert_S, stable=True)
    return DispatchPlan(
        sort_order_S=sort_order_S,
        token_of_row_S=sort_order_S // top_k,
        counts_E=torch.bincount(flat_expert_S, minlength=num_experts),
        num_tokens=num_tokens,
        top_k=top_k,
    )


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather token rows into expert-sorted order: (T, D) -> (S, D)."""
    return x_TD.index_select(0, plan.token_of_row_S)


def combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Un-sort expert outputs and sum each token's K slots with its gate weights: (S, D) -> (T, D)."""
    y_slots_SD = torch.empty_like(y_SD).index_copy(0, plan.sort_order_S, y_SD)
    y_TKD = y_slots_SD.view(plan.num_tokens, plan.top_k, -1)
    return torch.einsum("tkd,tk->td", y_TKD, weights_TK.to(y_TKD.dtype))
