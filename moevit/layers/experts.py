"""Expert weights as stacked tensors and their grouped matmuls.

Each expert is the two-layer MLP of a ViT block (fc1 -> GELU -> fc2). Stacking the E experts'
weights into (E, out, in) tensors keeps per-expert slicing trivial (pruning, expert-parallel
sharding, upcycling all index dim 0) and matches `nn.Linear`'s (out, in) layout, so a dense
`Mlp.fc1.weight` copies into `fc1_weight[e]` unchanged.

The experts' MLP runs as one autograd function over the expert-sorted rows (`grouped_mlp`; the
reasons, measured, in `_GroupedLinear` and `_GroupedMlp`); under `torch.jit.trace` (fvcore's flop
counter) the same map runs as plain `F.linear` calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute in here: autocast's, if it is on, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """`F.linear(x, weight, bias)` written into `out`: the same addmm (mm without bias), the same bits."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _blocks(counts: list[int]):
    """(expert, first row, end row) of every expert that has rows."""
    start = 0
    for e, rows in enumerate(counts):
        if rows:
            yield e, start, start + rows
        start += rows


def _bias_grad(grad_SO: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert row sums of the gradient, (E, O), as one matmul with the (E, S) block indicator:
    one kernel instead of E small reductions (each a thread wake-up on a busy machine)."""
    expert_of_row_S = torch.repeat_interleave(
        torch.arange(len(counts), device=grad_SO.device), torch.tensor(counts, device=grad_SO.device)
    )
    indicator_ES = torch.arange(len(counts), device=grad_SO.device)[:, None] == expert_of_row_S[None, :]
    return indicator_ES.to(grad_SO.dtype).mm(grad_SO)


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


def _cast_grads(grads, dtypes):
    """Gradients in the dtypes of the inputs they belong to (they differ under autocast)."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))


class _GroupedLinear(torch.autograd.Function):
    """Expert e's linear map on its block of rows, written straight into one output buffer.

    Why not autograd over `F.linear(block, weight_EOI[e])` per expert: indexing the stacked weight
    makes autograd materialise a zero (E, O, I) gradient per expert and sum them (E^2 work: 40% of
    the layer's CPU time at E16 in torch.profiler), and the per-block outputs and input gradients are concatenated (an
    extra copy each way). Here every product writes its rows of a preallocated output, and the
    backward writes each expert's slice of the weight gradient in place.
    """

    @staticmethod
    def forward(ctx, x_SI, weight_EOI, bias_EO, counts):
        dtype = _compute_dtype(x_SI)
        x, weight = x_SI.to(dtype), weight_EOI.to(dtype)
        bias = None if bias_EO is None else bias_EO.to(dtype)
        out_SO = x.new_empty(x.shape[0], weight.shape[1])
        for e, start, end in _blocks(counts):
            _linear_into(out_SO[start:end], x[start:end], weight[e], None if bias is None else bias[e])
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        ctx.dtypes = _dtypes(x_SI, weight_EOI, bias_EO)
        return out_SO

    @staticmethod
    def backward(ctx, grad_SO):
        x, weight = ctx.saved_tensors
        grad_SO = grad_SO.to(x.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = _empty_weight_grad(weight, ctx.counts) if need_w else None
        for e, start, end in _blocks(ctx.counts):
            g = grad_SO[start:end]
            if need_x:
                torch.mm(g, weight[e], out=grad_x[start:end])
            if need_w:
                torch.mm(g.t(), x[start:end], out=grad_w[e])
        grad_b = _bias_grad(grad_SO, ctx.counts) if need_b else None
        return (*_cast_grads((grad_x, grad_w, grad_b), ctx.dtypes), None)


class _GroupedMlp(torch.autograd.Function):
    """fc1 -> activation -> fc2 of every expert on its block of rows, one block at a time.

    Against two grouped linears around a full-size activation: the activation and its backward
    run on one expert's block while it is in cache instead of on an (S, H) array in memory, and
    only the pre-activation is saved (the activation is recomputed per block in the backward), so
    the layer keeps one (S, H) tensor for backward, not two. Each block's forward is `F.linear`,
    act, `F.linear` bit for bit (see `_GroupedLinear`).
    """

    @staticmethod
    def forward(ctx, x_SD, w1_EHD, b1_EH, w2_EDH, b2_ED, counts, act):
        dtype = _compute_dtype(x_SD)
        x, w1, w2 = x_SD.to(dtype), w1_EHD.to(dtype), w2_EDH.to(dtype)
        b1 = None if b1_EH is None else b1_EH.to(dtype)
        b2 = None if b2_ED is None else b2_ED.to(dtype)
        h_SH = x.new_empty(x.shape[0], w1.shape[1])
        y_SD = x.new_empty(x.shape[0], w2.shape[1])
        for e, start, end in _blocks(counts):
            _linear_into(h_SH[start:end], x[start:end], w1[e], None if b1 is None else b1[e])
            _linear_into(y_SD[start:end], act(h_SH[start:end]), w2[e], None if b2 is None else b2[e])
        ctx.save_for_backward(x, h_SH, w1, w2)
        ctx.counts, ctx.act = counts, act
        ctx.dtypes = _dtypes(x_SD, w1_EHD, b1_EH, w2_EDH, b2_ED)
        return y_SD

    @staticmethod
    def backward(ctx, grad_SD):
        x, h_SH, w1, w2 = ctx.saved_tensors
        grad_SD = grad_SD.to(x.dtype)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w1 = _empty_weight_grad(w1, ctx.counts) if need_w1 else None
        grad_w2 = _empty_weight_grad(w2, ctx.counts) if need_w2 else None
        grad_h_SH = h_SH.new_empty(h_SH.shape) if need_b1 else None  # kept whole only for the bias sums
        for e, start, end in _blocks(ctx.counts):
            g = grad_SD[start:end]
            h = h_SH[start:end]
            if need_w2:
                torch.mm(g.t(), ctx.act(h), out=grad_w2[e])
            out = None if grad_h_SH is None else grad_h_SH[start:end]
            grad_h = _act_backward(ctx.act, g.mm(w2[e]), h, out)
            if need_w1:
                torch.mm(grad_h.t(), x[start:end], out=grad_w1[e])
            if need_x:
                torch.mm(grad_h, w1[e], out=grad_x[start:end])
        grad_b1 = _bias_grad(grad_h_SH, ctx.counts) if need_b1 else None
        grad_b2 = _bias_grad(grad_SD, ctx.counts) if need_b2 else None
        grads = _cast_grads((grad_x, grad_w1, grad_b1, grad_w2, grad_b2), ctx.dtypes)
        return (*grads, None, None)


def _act_backward(
    act: nn.Module, grad_a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """d act(h) / dh applied to grad_a (written into `out` if given): GELU's own kernel, autograd
    for any other activation."""
    if isinstance(act, nn.GELU):
        if out is None:
            return torch.ops.aten.gelu_backward(grad_a, h, approximate=act.approximate)
        return torch.ops.aten.gelu_backward.grad_input(grad_a, h, approximate=act.approximate, grad_input=out)
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        grad_h = torch.autograd.grad(act(h), h, grad_a)[0]
    return grad_h if out is None else out.copy_(grad_h)


def _empty_weight_grad(weight_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised except for experts without rows, which get zeros (zero-filling all of it would
    cost a pass over every expert's weight for the few that need it)."""
    grad = torch.empty_like(weight_EOI)
    for e, rows in enumerate(counts):
        if rows == 0:
            grad[e].zero_()
    return grad


def _traced_grouped_linear(
    x_SI: torch.Tensor, counts: list[int], weight_EOI: torch.Tensor, bias_EO: torch.Tensor | None
) -> torch.Tensor:
    """The same map as plain `F.linear` calls, for `torch.jit.trace` (fvcore's flop counter): the
    tracer cannot record the kernels' `out=` writes into slices."""
    outputs = [
        F.linear(x_block, weight_EOI[e], None if bias_EO is None else bias_EO[e])
        for e, x_block in enumerate(x_SI.split(counts))
        if x_block.shape[0]
    ]
    if not outputs:
        return F.linear(x_SI, weight_EOI[0], None if bias_EO is None else bias_EO[0])
    return torch.cat(outputs)


def grouped_linear(
    x_SI: torch.Tensor, counts: list[int], weight_EOI: torch.Tensor, bias_EO: torch.Tensor | None
) -> torch.Tensor:
    """Apply expert e's linear map to its block of `counts[e]` consecutive rows of x."""
    _check_counts(x_SI, counts, weight_EOI)
    if torch.jit.is_tracing():
        return _traced_grouped_linear(x_SI, counts, weight_EOI, bias_EO)
    return _GroupedLinear.apply(x_SI, weight_EOI, bias_EO, counts)


def grouped_mlp(
    x_SD: torch.Tensor,
    counts: list[int],
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: nn.Module,
) -> torch.Tensor:
    """Expert e's MLP, fc2(act(fc1(x))), on its block of `counts[e]` consecutive rows of x."""
    _check_counts(x_SD, counts, fc1_weight)
    if torch.jit.is_tracing():
        hidden = act(_traced_grouped_linear(x_SD, counts, fc1_weight, fc1_bias))
        return _traced_grouped_linear(hidden, counts, fc2_weight, fc2_bias)
    return _GroupedMlp.apply(x_SD, fc1_weight, fc1_bias, fc2_weight, fc2_bias, counts, act)


def _check_counts(x: torch.Tensor, counts: list[int], weight: torch.Tensor) -> None:
    if len(counts) != weight.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(
            f"counts {counts} must have one entry per expert ({weight.shape[0]}) "
            f"and sum to the {x.shape[0]} rows of x"
        )


class GroupedExperts(nn.Module):
    """E independent MLP experts applied to expert-sorted rows.

    Args:
        num_experts: experts held by this module (E; a shard of them under expert parallelism).
        dim: input and output width (D).
        hidden: expert hidden width (H).
        act_layer: activation between the two linears.
        bias: whether both linears have biases.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, bias: bool = True
    ):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer()
        # Experts that must not train (continual learning, moevit.continual.freeze). A slice of a stacked
        # tensor cannot have its own requires_grad, so this module only records them: training runs the
        # experts through the expert-parallel wrapper (also at ep_size 1), which gives every expert its
        # own parameters and creates these ones with requires_grad False.
        self.frozen_experts: frozenset[int] = frozenset()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as timm's ViT init for its Linear layers, so MoE and dense blocks start alike.
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        for bias in (self.fc1_bias, self.fc2_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD holds rows sorted by expert, `counts_E[e]` rows for expert e."""
        return grouped_mlp(
            x_SD,
            counts_E.tolist(),
            self.fc1_weight,
            self.fc1_bias,
            self.fc2_weight,
            self.fc2_bias,
            self.act,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
