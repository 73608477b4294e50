"""The experts' two paths (moevit.layers.experts): the grouped GEMM (`torch._grouped_mm`) against the
per-expert loop, values and gradients, on stacked and per-expert parameters; the fallback; the config."""

import warnings

import pytest
import torch
from torch import nn

from moevit.config.errors import ConfigError
from moevit.config.loader import build_config
from moevit.config.schema import Config
from moevit.layers import experts as experts_module
from moevit.layers.experts import GroupedExperts, grouped_mlp, resolve_expert_impl
from moevit.models import create_model

DIM, HIDDEN = 8, 16  # fp32 rows of 32 and 64 bytes: what the grouped GEMM takes
COUNTS = {
    "uneven, one empty": [5, 0, 9, 2],
    "one expert takes all": [0, 0, 16, 0],
    "no rows": [0, 0, 0, 0],
}


def _params(num_experts=4, dim=DIM, hidden=HIDDEN, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [
        (num_experts, hidden, dim),
        (num_experts, hidden),
        (num_experts, dim, hidden),
        (num_experts, dim),
    ]
    return [torch.randn(shape, generator=generator, dtype=dtype) * 0.5 for shape in shapes]


def _run(impl, counts, params, per_expert=False, frozen=(), autocast=False):
    """Output, input gradient and parameter gradients (stacked; None for a frozen expert's)."""
    x = torch.randn(sum(counts), params[0].shape[2], generator=torch.Generator().manual_seed(1))
    x = x.to(params[0].dtype).requires_grad_()
    if per_expert:
        leaves = [[p[e].clone().requires_grad_(e not in frozen) for e in range(len(counts))] for p in params]
    else:
        leaves = [p.clone().requires_grad_() for p in params]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = grouped_mlp(x, counts, *leaves, nn.GELU(), impl)
    out_grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y.float() * out_grad).sum().backward()
    if per_expert:
        grads = [[leaf.grad for leaf in group] for group in leaves]
    else:
        grads = [leaf.grad for leaf in leaves]
    return y, x.grad, grads


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_gemm_matches_the_loop_in_values_and_gradients(counts):
    params = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn: the grouped GEMM itself must run
        y_grouped, gx_grouped, grads_grouped = _run("grouped", counts, params)
    assert type(y_grouped.grad_fn).__name__ == "_GroupedMmMlpBackward"
    y_loop, gx_loop, grads_loop = _run("loop", counts, params)
    assert type(y_loop.grad_fn).__name__ == "_GroupedMlpBackward"
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_grouped, gx_loop, rtol=1e-5, atol=1e-5)
    for name, grouped, loop in zip(
        ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), grads_grouped, grads_loop
    ):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5, msg=name)
    for e, rows in enumerate(counts):
        if rows == 0:  # an expert without rows: zero gradients on both paths, not leftovers
            assert all(not grad[e].any() for grad in grads_grouped + grads_loop)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_per_expert_parameters_run_the_same_function_and_frozen_experts_get_no_gradient(impl):
    """The expert-parallel wrapper's layout (one tensor per expert, some frozen) against stacked weights."""
    counts, params = COUNTS["uneven, one empty"], _params()
    y, gx, stacked = _run(impl, counts, params)
    y_pe, gx_pe, per_expert = _run(impl, counts, params, per_expert=True, frozen=(2,))
    assert torch.equal(y_pe, y) and torch.equal(gx_pe, gx)
    for stacked_grad, expert_grads in zip(stacked, per_expert):
        assert expert_grads[2] is None
        for e in (0, 1, 3):
            assert torch.equal(expert_grads[e], stacked_grad[e])


def test_grouped_gemm_under_bf16_autocast_on_cpu():
    """torch 2.14 takes bf16 on CPU, so the grouped GEMM itself runs (no fallback), in bf16."""
    counts, params = COUNTS["uneven, one empty"], _params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_grouped, gx_grouped, grads_grouped = _run("grouped", counts, params, autocast=True)
    assert type(y_grouped.grad_fn).__name__ == "_GroupedMmMlpBackward"
    y_loop, gx_loop, grads_loop = _run("loop", counts, params, autocast=True)
    assert y_grouped.dtype == y_loop.dtype == torch.bfloat16
    assert gx_grouped.dtype == torch.float32 and grads_grouped[0].dtype == torch.float32
    # bf16's 8-bit mantissa; the grouped path rounds before adding the bias, addmm after
    torch.testing.assert_close(y_grouped, y_loop, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_grouped, gx_loop, rtol=3e-2, atol=3e-2)
    for grouped, loop in zip(grads_grouped, grads_loop):
        torch.testing.assert_close(grouped, loop, rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("dim", "dtype", "reason"),
    [(6, torch.float32, "not a multiple of 16 bytes"), (8, torch.float64, "not torch.float64")],
)
def test_a_call_the_grouped_gemm_cannot_take_runs_the_loop_and_says_why(dim, dtype, reason, monkeypatch):
    monkeypatch.setattr(experts_module, "_warned", set())
    counts, params = COUNTS["uneven, one empty"], _params(dim=dim, dtype=dtype)
    with pytest.warns(UserWarning, match=reason):
        y, gx, grads = _run("grouped", counts, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason, not every step
        _run("grouped", counts, params)
    y_loop, gx_loop, grads_loop = _run("loop", counts, params)
    assert torch.equal(y, y_loop) and torch.equal(gx, gx_loop)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_loop))


def test_auto_is_the_measured_default_of_each_device():
    assert resolve_expert_impl("auto", torch.device("cpu")) == experts_module.AUTO_IMPL["cpu"]
    assert resolve_expert_impl("auto", torch.device("cuda")) == "grouped"  # unmeasured: docs say so
    assert resolve_expert_impl("auto", torch.device("meta")) == "loop"
    assert resolve_expert_impl("grouped", torch.device("cpu")) == "grouped"


def _config(moe: dict) -> Config:
    return build_config(
        Config, {"tasks": {"a": {"type": "classification", "num_classes": 3}}, "model": {"moe": moe}}
    )


def test_expert_impl_reaches_every_expert_layer_and_the_expert_parallel_wrapper():
    from moevit.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel

    overrides = _config({"expert_impl": "grouped"}).model.variant_overrides()
    assert overrides["expert_impl"] == "grouped"
    assert "expert_impl" not in _config({}).model.variant_overrides()  # None: the model's default
    model = create_model("moevit_debug", tasks=["a"], **overrides)
    layers = list(model.mlp_layers().values())
    assert layers and all(layer.experts.expert_impl == "grouped" for layer in layers)
    apply_expert_parallel(model, 1)
    assert all(isinstance(layer.experts, ExpertParallelExperts) for layer in layers)
    assert all(layer.experts.expert_impl == "grouped" for layer in layers)
    assert all(
        m.expert_impl == "auto"
        for m in create_model("moevit_debug", tasks=["a"]).modules()
        if isinstance(m, GroupedExperts)
    )


def test_a_bad_expert_impl_is_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"model\.moe: expert_impl must be auto, loop or grouped, got 'fast'"
    ):
        _config({"expert_impl": "fast"})
    with pytest.raises(ValueError, match="expert_impl must be one of auto, loop, grouped, got 'fast'"):
        GroupedExperts(4, DIM, HIDDEN, expert_impl="fast")
