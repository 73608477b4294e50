"""Expert weights as stacked tensors and their grouped matmuls.

Each expert is the two-layer MLP of a ViT block (fc1 -> GELU -> fc2). Stacking the E experts'
weights into (E, out, in) tensors keeps per-expert slicing trivial (pruning, expert-parallel
sharding, upcycling all index dim 0) and matches `nn.Linear`'s (out, in) layout, so a dense
`Mlp.fc1.weight` copies into `fc1_weight[e]` unchanged.

The experts' MLP runs as one autograd function over the expert-sorted rows (`grouped_mlp`), by one
of two implementations (`expert_impl`, the config's `model.moe.expert_impl`):

- "loop": one GEMM per expert, written into preallocated buffers (`_GroupedMlp`; the reasons,
  measured, there and in `_GroupedLinear`);
- "grouped": one `torch._grouped_mm` per matmul for all experts (`_GroupedMmMlp`), the field's
  grouped GEMM (torchtitan's MoE uses it in bf16 on H100).

"auto" picks per device (`AUTO_IMPL`). Where `torch._grouped_mm` cannot take the call (device, dtype,
alignment: `grouped_mm_refusal`) the grouped path falls back to the loop with a one-time warning
naming why, never an error. Under `torch.jit.trace` (fvcore's flop counter) the same map runs as
plain `F.linear` calls.
"""

from __future__ import annotations

import warnings

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
    one kernel instead of E small reductions, for the grouped-GEMM path (one kernel per step is its
    point) and `_GroupedLinear`. The loop path sums per block instead (measured faster, `_GroupedMlp`)."""
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


class _ExpertParams:
    """The experts' (fc1 weight, fc1 bias, fc2 weight, fc2 bias) as the flat tensor list autograd sees.

    Two layouts: `stacked`, four (E, ...) tensors (`GroupedExperts`), or E tensors per name, one per
    expert (the expert-parallel wrapper's `ExpertMlp`s, which DeepSpeed needs as separate parameters).
    Either way `w1[e]` is expert e's, so one function serves both (no per-step stacking copy on the loop
    path). Biases are left out of the flat list when the experts have none.
    """

    def __init__(self, stacked: bool, num_experts: int, has_bias: bool):
        self.stacked, self.num_experts, self.has_bias = stacked, num_experts, has_bias

    def flatten(self, w1, b1, w2, b2) -> tuple:
        groups = (w1, b1, w2, b2) if self.has_bias else (w1, w2)
        n = 1 if self.stacked else self.num_experts
        return tuple(t for group in groups for t in ((group,) if self.stacked else (group or (None,) * n)))

    def split(self, flat) -> tuple:
        """(w1, b1, w2, b2) from `flatten`'s order; works on any per-tensor list (e.g. needs_input_grad)."""
        n = 1 if self.stacked else self.num_experts
        groups = [flat[i * n : (i + 1) * n] for i in range(4 if self.has_bias else 2)]
        groups = [group[0] if self.stacked else tuple(group) for group in groups]
        return tuple(groups) if self.has_bias else (groups[0], None, groups[1], None)


def _cast(group, dtype: torch.dtype):
    if group is None or isinstance(group, torch.Tensor):
        return None if group is None else group.to(dtype)
    return tuple(t.to(dtype) for t in group)


def _grad_buffers(group, needs, counts: list[int]):
    """Where the gradients of one parameter group go: uninitialised except for experts without rows
    (zeros); None where no gradient is wanted. A stacked group gets one (E, ...) buffer."""
    if group is None:
        return None
    if isinstance(group, torch.Tensor):
        return _empty_weight_grad(group, counts) if needs else None
    return tuple(
        (torch.zeros_like(t) if rows == 0 else torch.empty_like(t)) if need else None
        for t, need, rows in zip(group, needs, counts)
    )


def _slot(buffers, e: int) -> torch.Tensor | None:
    return None if buffers is None else buffers[e]


class _GroupedMlp(torch.autograd.Function):
    """fc1 -> activation -> fc2 of every expert on its block of rows, one block at a time.

    Against two grouped linears around a full-size activation: the activation and its backward
    run on one expert's block while it is in cache instead of on an (S, H) array in memory, and
    only the pre-activation is saved (the activation is recomputed per block in the backward), so
    the layer keeps one (S, H) tensor for backward, not two. Each block's forward is `F.linear`,
    act, `F.linear` bit for bit (see `_GroupedLinear`). Bias gradients are per-block row sums
    written into their slots (measured against one (E, S) indicator matmul: 5x faster at 1 thread,
    and the train step's profile showed the indicator's repeat_interleave/index_select).
    """

    @staticmethod
    def forward(ctx, x_SD, counts, act, layout: _ExpertParams, *params):
        dtype = _compute_dtype(x_SD)
        x = x_SD.to(dtype)
        w1, b1, w2, b2 = (_cast(group, dtype) for group in layout.split(params))
        h_SH = x.new_empty(x.shape[0], w1[0].shape[0])
        y_SD = x.new_empty(x.shape[0], w2[0].shape[0])
        for e, start, end in _blocks(counts):
            _linear_into(h_SH[start:end], x[start:end], w1[e], _slot(b1, e))
            _linear_into(y_SD[start:end], act(h_SH[start:end]), w2[e], _slot(b2, e))
        weights = (w1, w2) if layout.stacked else (*w1, *w2)
        ctx.save_for_backward(x, h_SH, *weights)
        ctx.counts, ctx.act, ctx.layout = counts, act, layout
        ctx.dtypes = (x_SD.dtype, *(p.dtype for p in params))
        return y_SD

    @staticmethod
    def backward(ctx, grad_SD):
        x, h_SH, *weights = ctx.saved_tensors
        layout, counts = ctx.layout, ctx.counts
        n = 1 if layout.stacked else layout.num_experts
        w1, w2 = (weights[0], weights[1]) if layout.stacked else (weights[:n], weights[n:])
        grad_SD = grad_SD.to(x.dtype)
        need_x = ctx.needs_input_grad[0]
        need_w1, need_b1, need_w2, need_b2 = layout.split(ctx.needs_input_grad[4:])
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w1, grad_w2 = _grad_buffers(w1, need_w1, counts), _grad_buffers(w2, need_w2, counts)
        grad_b1, grad_b2 = _bias_grad_buffers(w1, need_b1), _bias_grad_buffers(w2, need_b2)
        for e, start, end in _blocks(counts):
            g = grad_SD[start:end]
            h = h_SH[start:end]
            if _slot(grad_w2, e) is not None:
                torch.mm(g.t(), ctx.act(h), out=grad_w2[e])
            if _slot(grad_b2, e) is not None:
                torch.sum(g, 0, out=grad_b2[e])
            grad_h = _act_backward(ctx.act, g.mm(w2[e]), h, None)
            if _slot(grad_w1, e) is not None:
                torch.mm(grad_h.t(), x[start:end], out=grad_w1[e])
            if _slot(grad_b1, e) is not None:
                torch.sum(grad_h, 0, out=grad_b1[e])
            if need_x:
                torch.mm(grad_h, w1[e], out=grad_x[start:end])
        grads = (grad_x, *layout.flatten(grad_w1, grad_b1, grad_w2, grad_b2))
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (grads[0], None, None, None, *grads[1:])


def _bias_grad_buffers(weights, needs):
    """Zeroed bias gradients shaped by the weights' output rows, (E, O) stacked or E of (O,): the
    per-block sums skip experts without rows, which keep the zeros. None where none is wanted."""
    if needs is None:  # the experts have no biases
        return None
    if isinstance(weights, torch.Tensor):
        return weights.new_zeros(weights.shape[:2]) if needs else None
    return tuple(w.new_zeros(w.shape[0]) if need else None for w, need in zip(weights, needs))


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


# ----------------------------------------------------------------- the grouped-GEMM path
EXPERT_IMPLS = ("auto", "loop", "grouped")
DEFAULT_EXPERT_IMPL = "auto"
# What "auto" runs per device type. CPU: measured with benchmarks/moe_layer.py (docs/performance.md,
# "Expert paths"). CUDA: NOT measured yet (no GPU was at hand); the grouped GEMM is the field's choice
# there, so it is the default until benchmarks/gpu_check.py has measured both.
AUTO_IMPL = {"cpu": "loop", "cuda": "grouped"}
# torch._grouped_mm's dtypes (it refuses float64); on CUDA its grouped kernel is bf16 on sm90+ only.
_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}
_GROUPED_MM_ALIGN_BYTES = 16  # "strides should be multiple of 16 bytes" (and TMA's base-address rule on CUDA)
_warned: set[str] = set()


def check_expert_impl(expert_impl: str) -> None:
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {', '.join(EXPERT_IMPLS)}, got {expert_impl!r}")


def resolve_expert_impl(expert_impl: str, device: torch.device) -> str:
    """The path that runs, loop or grouped: auto becomes its device type's default (the loop if none)."""
    if expert_impl == "auto":
        return AUTO_IMPL.get(device.type, "loop")
    return expert_impl


def grouped_mm_refusal(x_SD: torch.Tensor, dtype: torch.dtype, *weights: torch.Tensor) -> str | None:
    """Why `torch._grouped_mm` cannot run the experts' matmuls on these operands, or None if it can.

    The rules are the op's own (probed in torch 2.14 on CPU; the CUDA ones from its checks, unmeasured
    here): float32/bf16/fp16 on CPU, bf16 on CUDA (sm90+), every row stride and base address a multiple
    of 16 bytes. Checked before the call so that training never meets the op's error.
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = x_SD.device
    allowed = _GROUPED_MM_DTYPES.get(device.type)
    if allowed is None:
        return f"torch._grouped_mm does not run on {device.type}"
    if dtype not in allowed:
        return f"torch._grouped_mm on {device.type} takes {', '.join(str(d) for d in allowed)}, not {dtype}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return f"torch._grouped_mm's grouped kernel needs sm90+, {torch.cuda.get_device_name(device)} is not"
    widths = {x_SD.shape[1], *(w.shape[-1] for w in weights), *(w.shape[-2] for w in weights)}
    if any(width * dtype.itemsize % _GROUPED_MM_ALIGN_BYTES for width in widths):
        return f"expert widths {sorted(widths)} in {dtype} give rows not a multiple of 16 bytes"
    if any(t.data_ptr() % _GROUPED_MM_ALIGN_BYTES for t in (x_SD, *weights)):
        return "an operand's storage is not 16-byte aligned"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"expert_impl grouped: falling back to the per-expert loop: {reason}", stacklevel=3)


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """End row of every expert's block, int32 on the device: `torch._grouped_mm`'s `offs`."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)


def _rows_bias(bias_EO: torch.Tensor, counts: list[int], num_rows: int) -> torch.Tensor:
    """(S, O): every row's expert's bias (the grouped GEMM takes no bias yet: "Bias not supported yet")."""
    expert_of_row_S = torch.repeat_interleave(
        torch.arange(len(counts), device=bias_EO.device),
        torch.tensor(counts, device=bias_EO.device),
        output_size=num_rows,
    )
    return bias_EO.index_select(0, expert_of_row_S)


def _zero_empty_experts(grad_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An expert without rows gets a zero weight gradient whatever the kernel leaves in its slice."""
    for e, rows in enumerate(counts):
        if rows == 0:
            grad_EOI[e].zero_()
    return grad_EOI


def _stack(group, dtype: torch.dtype) -> torch.Tensor | None:
    """One (E, ...) tensor in `dtype`: the grouped GEMM takes the experts' weights stacked (per-expert
    parameters are copied once per call, the price of running the wrapper's experts through it)."""
    if group is None or isinstance(group, torch.Tensor):
        return _cast(group, dtype)
    return torch.stack([t.to(dtype) for t in group])


def _unstack(grad, needs, stacked: bool):
    """A stacked gradient back in its parameters' layout (views per expert, None where not wanted)."""
    if grad is None or stacked:
        return grad if needs else None
    return tuple(g if need else None for g, need in zip(grad, needs))


class _GroupedMmMlp(torch.autograd.Function):
    """fc1 -> activation -> fc2 of every expert as two `torch._grouped_mm` calls, and four in backward.

    Saves what `_GroupedMlp` saves (the input and the pre-activation; the activation is recomputed in
    the backward), so both paths hold the same activation memory. The weight gradients are the op's
    2d x 2d form, grad^T (O, S) x input (S, I) with the offsets on S: one (E, O, I) result in the
    stacked layout, no per-expert slices.
    """

    @staticmethod
    def forward(ctx, x_SD, counts, act, layout: _ExpertParams, *params):
        dtype = _compute_dtype(x_SD)
        x = x_SD.to(dtype)
        w1, b1, w2, b2 = (_stack(group, dtype) for group in layout.split(params))
        offs = _offsets(counts, x.device)
        h_SH = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        if b1 is not None:
            h_SH += _rows_bias(b1, counts, x.shape[0])
        y_SD = torch._grouped_mm(act(h_SH), w2.transpose(1, 2), offs=offs)
        if b2 is not None:
            y_SD += _rows_bias(b2, counts, x.shape[0])
        ctx.save_for_backward(x, h_SH, w1, w2, offs)
        ctx.counts, ctx.act, ctx.layout = counts, act, layout
        ctx.dtypes = (x_SD.dtype, *(p.dtype for p in params))
        return y_SD

    @staticmethod
    def backward(ctx, grad_SD):
        x, h_SH, w1, w2, offs = ctx.saved_tensors
        layout, counts = ctx.layout, ctx.counts
        grad_SD = grad_SD.to(x.dtype).contiguous()
        need_x = ctx.needs_input_grad[0]
        need_w1, need_b1, need_w2, need_b2 = layout.split(ctx.needs_input_grad[4:])
        grad_w2 = grad_w1 = grad_b1 = grad_b2 = None
        if any(_as_tuple(need_w2)):
            grad_w2 = _zero_empty_experts(torch._grouped_mm(grad_SD.t(), ctx.act(h_SH), offs=offs), counts)
        grad_h_SH = _act_backward(ctx.act, torch._grouped_mm(grad_SD, w2, offs=offs), h_SH, None)
        if any(_as_tuple(need_w1)):
            grad_w1 = _zero_empty_experts(torch._grouped_mm(grad_h_SH.t(), x, offs=offs), counts)
        grad_x = torch._grouped_mm(grad_h_SH, w1, offs=offs) if need_x else None
        if need_b1 is not None and any(_as_tuple(need_b1)):
            grad_b1 = _bias_grad(grad_h_SH, counts)
        if need_b2 is not None and any(_as_tuple(need_b2)):
            grad_b2 = _bias_grad(grad_SD, counts)
        stacked = layout.stacked
        grads = (
            grad_x,
            *layout.flatten(
                _unstack(grad_w1, need_w1, stacked),
                _unstack(grad_b1, need_b1, stacked),
                _unstack(grad_w2, need_w2, stacked),
                _unstack(grad_b2, need_b2, stacked),
            ),
        )
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (grads[0], None, None, None, *grads[1:])


def _as_tuple(needs) -> tuple:
    return needs if isinstance(needs, tuple) else (needs,)


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
    _check_counts(x_SI, counts, weight_EOI.shape[0])
    if torch.jit.is_tracing():
        return _traced_grouped_linear(x_SI, counts, weight_EOI, bias_EO)
    return _GroupedLinear.apply(x_SI, weight_EOI, bias_EO, counts)


def grouped_mlp(
    x_SD: torch.Tensor,
    counts: list[int],
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    act: nn.Module,
    expert_impl: str = DEFAULT_EXPERT_IMPL,
) -> torch.Tensor:
    """Expert e's MLP, fc2(act(fc1(x))), on its block of `counts[e]` consecutive rows of x.

    The weights and biases are either stacked, (E, out, in) and (E, out) tensors, or sequences of E
    per-expert (out, in) and (out,) tensors (the expert-parallel wrapper's parameters); biases may be
    None. `expert_impl`: "loop", "grouped" or "auto" (module docstring). A grouped call the op cannot
    take runs the loop (warned once per reason).
    """
    stacked = isinstance(fc1_weight, torch.Tensor)
    num_experts = fc1_weight.shape[0] if stacked else len(fc1_weight)
    _check_counts(x_SD, counts, num_experts)
    if torch.jit.is_tracing():
        hidden = act(_traced_grouped_linear(x_SD, counts, fc1_weight, fc1_bias))
        return _traced_grouped_linear(hidden, counts, fc2_weight, fc2_bias)
    layout = _ExpertParams(stacked, num_experts, has_bias=fc1_bias is not None)
    args = (x_SD, counts, act, layout, *layout.flatten(fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    if resolve_expert_impl(expert_impl, x_SD.device) == "grouped":
        first = (lambda w: w) if stacked else (lambda w: w[0])
        reason = grouped_mm_refusal(x_SD, _compute_dtype(x_SD), first(fc1_weight), first(fc2_weight))
        if reason is None:
            try:
                return _GroupedMmMlp.apply(*args)
            except RuntimeError as error:  # a rule the pre-check does not know (another torch, device)
                reason = f"torch._grouped_mm refused the call: {str(error).splitlines()[0]}"
        _warn_once(reason)
    return _GroupedMlp.apply(*args)


def _check_counts(x: torch.Tensor, counts: list[int], num_experts: int) -> None:
    if len(counts) != num_experts or sum(counts) != x.shape[0]:
        raise ValueError(
            f"counts {counts} must have one entry per expert ({num_experts}) "
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
        expert_impl: how the matmuls run: "loop", "grouped" or "auto" (module docstring).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        expert_impl: str = DEFAULT_EXPERT_IMPL,
    ):
        super().__init__()
        check_expert_impl(expert_impl)
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.expert_impl = expert_impl
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
            self.expert_impl,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"expert_impl={self.expert_impl}"
        )
