"""parallel.precision without a GPU: what each precision resolves to, the DeepSpeed config sections it
builds (parsed by DeepSpeed's own config classes), fp16 refused on the CPU before any rendezvous, the fp16
loss scaler surviving the weights-only checkpoint loader, and the TF32 switch's decision."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, DynamicLossScaler
from deepspeed.runtime.precision_config import DeepSpeedFP16Config, get_float16_config

from moevit.config import Config, ConfigError, build_config
from moevit.parallel.checkpoint import load_tensors_only
from moevit.parallel.engine import deepspeed_config
from moevit.parallel.layout import resolve_precision
from moevit.parallel.precision import FP16_DYNAMIC_LOSS_SCALING, enable_tf32
from moevit.parallel.setup import initialize_distributed


def config(precision: str) -> Config:
    return build_config(Config, config_dict(precision))


def config_dict(precision: str) -> dict:
    return {
        "model": {"name": "moevit_debug"},
        "tasks": {"a": {"type": "classification", "num_classes": 2}},
        "parallel": {"precision": precision},
    }


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.is_available() answers True: builds the config a GPU job would, computes nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize(
    ("precision", "cuda", "expected"),
    [
        ("auto", False, torch.float32),
        ("auto", True, torch.bfloat16),
        ("fp32", True, torch.float32),
        ("bf16", False, torch.bfloat16),
        ("fp16", True, torch.float16),
    ],
)
def test_precision_resolves_per_device(precision, cuda, expected):
    assert resolve_precision(config(precision), cuda=cuda) == expected


def test_fp16_on_the_cpu_is_refused_with_the_key_named():
    with pytest.raises(ConfigError, match=r"parallel\.precision=fp16 needs CUDA") as err:
        resolve_precision(config("fp16"), cuda=False)
    assert "\n" not in str(err.value)


def test_fp16_on_the_cpu_is_refused_before_the_process_group_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"parallel\.precision=fp16"):
        initialize_distributed(config("fp16"))
    assert not torch.distributed.is_initialized()


def test_bf16_reaches_deepspeed_as_torch_autocast_only():
    ds = deepspeed_config(config("bf16"))
    assert ds["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],  # gradient reduction stays fp32
    }
    assert not get_float16_config(ds).enabled
    assert "bf16" not in ds  # DeepSpeed's bf16 section would cast the weights to bf16


def test_fp32_enables_no_reduced_precision():
    ds = deepspeed_config(config("fp32"))
    assert not ds["torch_autocast"]["enabled"]
    assert not get_float16_config(ds).enabled


def test_fp16_reaches_deepspeed_with_dynamic_loss_scaling_at_its_defaults(fake_cuda):
    ds = deepspeed_config(config("fp16"))
    assert not ds["torch_autocast"]["enabled"]  # the GradScaler path of torch_autocast stays off
    parsed = get_float16_config(ds)  # DeepSpeed's own parser and validators
    assert parsed.enabled and parsed.auto_cast
    assert parsed.loss_scale == 0  # 0 is DeepSpeed's switch for dynamic scaling
    defaults = DeepSpeedFP16Config()
    for key in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        assert ds["fp16"][key] == getattr(defaults, key), key
    assert parsed.dynamic_loss_scale_args() == defaults.dynamic_loss_scale_args()
    assert set(FP16_DYNAMIC_LOSS_SCALING) <= set(ds["fp16"])


def test_the_fp16_loss_scaler_round_trips_through_the_weights_only_loader(fake_cuda, tmp_path):
    """ZeRO 1/2 optimizer files hold the DynamicLossScaler object itself; the checkpoint loader
    (torch.load(weights_only=True) with DeepSpeed's record types allowed) must rebuild it exactly."""
    args = get_float16_config(deepspeed_config(config("fp16"))).dynamic_loss_scale_args()
    scaler = CreateLossScaler(
        torch.float16, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args=args
    )
    assert isinstance(scaler, DynamicLossScaler)
    assert (scaler.cur_scale, scaler.scale_window, scaler.delayed_shift, scaler.min_scale) == (
        2**16,
        1000,
        2,
        1,
    )
    # A state other than the initial one, as after a few overflows (update_scale logs through
    # deepspeed.comm, which needs a process group).
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 2**13, 40, 37, 1
    path = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True, "step": torch.tensor(3)}, path)
    loaded = load_tensors_only(path)["loss_scaler"]
    assert type(loaded) is DynamicLossScaler
    assert vars(loaded) == vars(scaler)


def test_tf32_is_switched_on_for_cuda_only():
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        assert enable_tf32(cuda=False) is False
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"  # CPU runs stay exact fp32
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert enable_tf32(cuda=True) is True
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


def test_precision_keys_are_validated_by_the_schema():
    with pytest.raises(ConfigError, match="precision"):
        build_config(Config, config_dict("fp8"))
