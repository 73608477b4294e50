"""MFU (moevit.train.mfu): the arithmetic, the peak table's matching, the run's peak, and FLOPs as `plan` counts."""

import pytest
import torch

from moevit.config import build_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.train.mfu import (
    device_peak_tflops,
    forward_gflops_per_image,
    model_flops_utilization,
    precision_name,
    run_peak_tflops,
    tf32_matmuls_enabled,
    training_flops,
)
from moevit.train.plan import build_meta_model, plan_report


def test_mfu_of_a_known_case():
    # 2 devices of 100 TFLOPS for 0.5 s could do 1e14 FLOPs; 2.5e13 of model FLOPs is a quarter of that.
    assert model_flops_utilization(2.5e13, seconds=0.5, world_size=2, peak_tflops=100.0) == pytest.approx(
        0.25
    )


def test_training_flops_are_three_forwards_of_every_image():
    images, gflops = {"a": 4, "b": 2}, {"a": 1.5, "b": 10.0}
    assert training_flops(images, gflops) == pytest.approx(3 * (4 * 1.5e9 + 2 * 10e9))
    assert training_flops({}, gflops) == 0


@pytest.mark.parametrize(
    ("device_name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", ("H100 SXM", 989.5)),
        ("NVIDIA H100 PCIe", "bf16", ("H100 PCIe", 756.5)),
        ("NVIDIA H100 NVL", "tf32", ("H100 NVL", 417.5)),
        ("NVIDIA H200", "fp16", ("H200 SXM", 989.5)),
        ("NVIDIA A100-SXM4-40GB", "tf32", ("A100", 156.0)),
        ("NVIDIA A100 80GB PCIe", "bf16", ("A100", 312.0)),
        ("NVIDIA A10", "bf16", ("A10", 125.0)),
        ("NVIDIA L40S", "bf16", ("L40S", 362.05)),
        ("NVIDIA L40", "bf16", ("L40", 181.05)),
        ("NVIDIA L4", "fp32", ("L4", 30.3)),
        ("Tesla V100-SXM2-16GB", "fp16", ("V100 SXM2", 125.0)),
        ("Tesla V100-PCIE-32GB", "fp16", ("V100 PCIe", 112.0)),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 units: no peak, rather than a wrong one
        ("NVIDIA A10G", "bf16", None),  # not the A10: its tensor rates differ
        ("NVIDIA GeForce RTX 3090", "bf16", None),
    ],
)
def test_peak_table_lookup(device_name, precision, expected):
    assert device_peak_tflops(device_name, precision) == expected


def test_precision_column():
    assert precision_name(torch.bfloat16, tf32_matmuls=False) == "bf16"
    assert precision_name(torch.float16, tf32_matmuls=False) == "fp16"
    assert precision_name(torch.float32, tf32_matmuls=True) == "tf32"
    assert precision_name(torch.float32, tf32_matmuls=False) == "fp32"


def tiny(tiny_config, synth_root, **train) -> Config:
    return build_config(Config, tiny_config(synth_root, datasets=["imagenet", "ade20k"], train=train))


def test_run_peak_on_cpu_needs_the_config_value(tiny_config, synth_root):
    peak, line = run_peak_tflops(tiny(tiny_config, synth_root), torch.device("cpu"))
    assert peak is None and "MFU not logged" in line and "train.peak_tflops" in line
    peak, line = run_peak_tflops(tiny(tiny_config, synth_root, peak_tflops=2.5), torch.device("cpu"))
    assert peak == 2.5 and "2.5" in line


def test_run_peak_on_cuda_reads_the_table_at_the_run_precision(tiny_config, synth_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = build_config(Config, tiny_config(synth_root, datasets=["imagenet"], parallel={"precision": "bf16"}))
    assert run_peak_tflops(cfg, torch.device("cuda", 0))[0] == 989.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    peak, line = run_peak_tflops(cfg, torch.device("cuda", 0))
    assert peak is None and "RTX 3090" in line


def test_forward_flops_are_plans(tiny_config, synth_root):
    cfg = tiny(tiny_config, synth_root)
    model = build_meta_model(cfg)
    gflops = forward_gflops_per_image(model, {name: task.image_size for name, task in cfg.tasks.items()})
    report = plan_report(cfg, gpus=1)
    assert gflops == pytest.approx({name: row["gflops_per_image"] for name, row in report["tasks"].items()})
    assert gflops["ade20k"] > 0 and gflops["imagenet"] > 0


@pytest.mark.parametrize("value", [0, -1.0])
def test_peak_tflops_must_be_positive(tiny_config, synth_root, value):
    with pytest.raises(ConfigError, match="peak_tflops"):
        tiny(tiny_config, synth_root, peak_tflops=value)


def test_tf32_is_read_whichever_api_set_it():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # the new API: reading the legacy allow_tf32 would now raise
        assert tf32_matmuls_enabled()
        matmul.fp32_precision = "ieee"
        assert not tf32_matmuls_enabled()
    finally:
        matmul.fp32_precision = before


def test_flops_are_the_same_once_the_experts_are_sharded(tiny_config, synth_root):
    # moevit finetune and continual runs hand the loop a model whose experts are already wrapped for
    # expert parallelism (moevit.parallel.expert_parallel); the count must not depend on it.
    from moevit.factory import build_model
    from moevit.parallel.expert_parallel import apply_expert_parallel

    cfg = tiny(tiny_config, synth_root)
    model = build_model(cfg)
    sizes = {name: task.image_size for name, task in cfg.tasks.items()}
    whole = forward_gflops_per_image(model, sizes)
    apply_expert_parallel(model, 1)
    assert forward_gflops_per_image(model, sizes) == pytest.approx(whole)
