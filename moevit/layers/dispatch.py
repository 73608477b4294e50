"""Token dispatch and combine for top-k MoE layers, by sorting; dropless by default.

Every (token, slot) pair is one row of work. Sorting the T*K rows by expert id makes each
expert's rows contiguous, so experts run as a grouped matmul over `counts_E` row blocks; by
default no capacity factor, no dropped token (MegaBlocks, Gale et al. 2023, make the same choice).
The combine un-sorts and takes the gate-weighted sum over the K slots of each token.

With an expert capacity bound (moevit.layers.capacity) the plan holds only the kept slots: the
sorted buffer has fewer than T*K rows, and the combine gives each dropped slot a zero output.

The sorted layout is also what expert parallelism exchanges: the blocks for the experts of
rank r are contiguous, so one `all_to_all_single` with split sizes moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each (token, slot) row goes. S = T * K rows, fewer when slots were dropped for capacity."""

    sort_order_S: torch.Tensor  # row r of the sorted buffer is flat slot sort_order_S[r]
    token_of_row_S: torch.Tensor  # token feeding sorted row r
    counts_E: torch.Tensor  # rows per expert, in expert order (int64)
    num_tokens: int
    top_k: int
    unsort_order_S: torch.Tensor | None = None  # flat slot s sits in sorted row unsort_order_S[s]

    def __post_init__(self) -> None:
        if self.unsort_order_S is None and not self.drops:
            self.unsort_order_S = inverse_permutation(self.sort_order_S)

    @property
    def num_dropped(self) -> int:
        """Slots left out for capacity (their tokens get nothing from those experts)."""
        return self.num_tokens * self.top_k - self.sort_order_S.numel()

    @property
    def drops(self) -> bool:
        return self.num_dropped > 0


def inverse_permutation(order_S: torch.Tensor) -> torch.Tensor:
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


def plan_dispatch(
    expert_idx_TK: torch.Tensor, num_experts: int, kept_slots: torch.Tensor | None = None
) -> DispatchPlan:
    """The plan for every slot, or only for `kept_slots` (ascending flat indices t * K + k; see
    moevit.layers.capacity). Keeping every slot gives the dropless plan exactly."""
    num_tokens, top_k = expert_idx_TK.shape
    flat_expert_S = expert_idx_TK.reshape(-1)
    slots_S = None
    if kept_slots is not None and kept_slots.numel() < flat_expert_S.numel():
        slots_S, flat_expert_S = kept_slots, flat_expert_S[kept_slots]
    # stable: rows of one expert keep token order, so results do not depend on sort internals.
    sort_order_S = torch.argsort(flat_expert_S, stable=True)
    if slots_S is not None:
        sort_order_S = slots_S[sort_order_S]
    return DispatchPlan(
        sort_order_S=sort_order_S,
        token_of_row_S=sort_order_S // top_k,
        counts_E=torch.bincount(flat_expert_S, minlength=num_experts),
        num_tokens=num_tokens,
        top_k=top_k,
    )


class _GatherRows(torch.autograd.Function):
    """`x.index_select(0, index)` where input row i is read by exactly the K output rows
    `inverse[i*K : (i+1)*K]` (K = 1: a permutation). The backward is then a gather as well,
    grad_x[i] = sum_j grad_out[inverse[i*K + j]], instead of `index_select`'s own backward, an
    `index_add` whose scattered writes cost more."""

    @staticmethod
    def forward(ctx, x, index, inverse, top_k: int):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        grad_slots = grad_out.index_select(0, inverse)
        if ctx.top_k == 1:
            return grad_slots, None, None, None
        return grad_slots.view(-1, ctx.top_k, *grad_out.shape[1:]).sum(1), None, None, None


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather token rows into expert-sorted order: (T, D) -> (S, D)."""
    if plan.drops:  # not every token is read K times: _GatherRows' backward does not apply
        return x_TD.index_select(0, plan.token_of_row_S)
    return _GatherRows.apply(x_TD, plan.token_of_row_S, plan.unsort_order_S, plan.top_k)


def unsort(y_SD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Expert-sorted rows back to flat (token, slot) order: (S, D) -> (T*K, D), both ways a gather;
    a slot dropped for capacity gets a zero row."""
    if plan.drops:
        slots_SD = y_SD.new_zeros(plan.num_tokens * plan.top_k, *y_SD.shape[1:])
        return slots_SD.index_copy(0, plan.sort_order_S, y_SD)
    return _GatherRows.apply(y_SD, plan.unsort_order_S, plan.sort_order_S, 1)


def combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Un-sort expert outputs and sum each token's K slots with its gate weights: (S, D) -> (T, D)."""
    y_slots_SD = unsort(y_SD, plan)
    weights_TK = weights_TK.to(y_SD.dtype)
    if torch.jit.is_tracing():  # an einsum, which flop counters (fvcore) count as the contraction it is
        return torch.einsum("tkd,tk->td", y_slots_SD.view(plan.num_tokens, plan.top_k, -1), weights_TK)
    if plan.top_k == 1:  # the weight is 1, but multiplying keeps the gate in the graph
        return y_slots_SD * weights_TK
    y_TKD = y_slots_SD.view(plan.num_tokens, plan.top_k, -1)
    return (y_TKD * weights_TK.unsqueeze(-1)).sum(1)
