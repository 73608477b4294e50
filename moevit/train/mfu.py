"""Model FLOPs utilisation (MFU): the model's training FLOPs per second over what the devices could do.

    MFU = training FLOPs of a step / (step seconds x world size x device peak FLOP/s)

The FLOPs are the analytic count of `moevit plan` (moevit.models.flops.analytic_flops for the backbone
plus moevit.train.head_cost for the head: forward contractions only, 2 x multiply-adds, top_k experts
per token), times 3 for training (forward + backward, moevit.train.plan.TRAIN_FLOPS_PER_FORWARD). They
are the model's FLOPs, not the hardware's: recomputation (activation checkpointing), the elementwise
work the count ignores and padding are not credited, so MFU reads as useful work, as in PaLM's
definition (Chowdhery et al. 2022, appendix B).

The peak is the device's dense (no 2:4 sparsity) tensor-core rate at the run's precision: bf16, fp16,
tf32 (fp32 with TF32 matmuls on) or plain fp32, from the vendor's data sheet (`PEAK_TFLOPS`), or
`train.peak_tflops` from the config for any other device. benchmarks/gpu_check.py shares these
functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from moevit.config.schema import Config
from moevit.models.flops import analytic_flops
from moevit.models.multitask import MultiTaskModel
from moevit.parallel.layout import resolve_precision
from moevit.train.head_cost import FP32_BYTES, head_cost
from moevit.train.plan import TRAIN_FLOPS_PER_FORWARD

Precision = str  # "bf16" | "fp16" | "tf32" | "fp32"

# Dense peak TFLOPS per device (without the 2:4 structured-sparsity doubling the data sheets star), as
# (pattern matched against torch.cuda.get_device_name, label, {precision: TFLOPS}). First match wins,
# so a variant's pattern (H100 PCIe, H100 NVL) comes before the plain name. Sources, NVIDIA data sheets:
# H100/H200 SXM and PCIe/NVL: "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core GPU" data
# sheets; A100: "NVIDIA A100 Tensor Core GPU" data sheet (40 GB and 80 GB, SXM and PCIe share the
# rates); L40S, L40, L4, A40, A10: their product data sheets; V100 and T4: "NVIDIA Tesla V100 GPU
# Accelerator" and "NVIDIA T4" data sheets (no bf16 or tf32 units: fp16 tensor cores only).
PEAK_TFLOPS: tuple[tuple[str, str, dict[Precision, float]], ...] = (
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (r"\bA100\b", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA40\b", "A40", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bV100S\b", "V100S PCIe", {"fp16": 130.0, "fp32": 16.4}),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)


def precision_name(dtype: torch.dtype, tf32_matmuls: bool) -> Precision:
    """The peak column of a run computing in `dtype` (fp32 runs at the TF32 rate when TF32 matmuls are on)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if tf32_matmuls else "fp32"


def tf32_matmuls_enabled() -> bool:
    """Whether fp32 CUDA matmuls run on TF32 tensor cores. Read through the new `fp32_precision` API:
    once TF32 was set through it, torch raises on reading the legacy `allow_tf32` flag."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def device_peak_tflops(device_name: str, precision: Precision) -> tuple[str, float] | None:
    """(the table's label, dense peak TFLOPS) of the first `PEAK_TFLOPS` entry matching `device_name`
    (as torch.cuda.get_device_name reports it, e.g. "NVIDIA H100 80GB HBM3"), or None when no entry
    matches or the device has no unit for `precision` (bf16 on a V100)."""
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return (label, peaks[precision]) if precision in peaks else None
    return None


def run_peak_tflops(cfg: Config, device: torch.device) -> tuple[float | None, str]:
    """(one device's peak TFLOPS for the run's MFU, or None, and a line saying which peak or why none):
    `train.peak_tflops` when set, else the table's entry for the CUDA device at the run's precision.
    Read after the engine is built, which settles the precision and TF32."""
    if cfg.train.peak_tflops is not None:
        return (
            cfg.train.peak_tflops,
            f"MFU against train.peak_tflops={cfg.train.peak_tflops:g} TFLOPS per device",
        )
    if device.type != "cuda":
        return None, f"MFU not logged: no peak FLOP/s known for device '{device.type}'; set train.peak_tflops"
    name = torch.cuda.get_device_name(device)
    precision = precision_name(resolve_precision(cfg), tf32_matmuls_enabled())
    found = device_peak_tflops(name, precision)
    if found is None:
        return None, f"MFU not logged: no {precision} peak listed for '{name}'; set train.peak_tflops"
    label, peak = found
    return peak, f"MFU against the {label}'s dense {precision} peak, {peak:g} TFLOPS per device"


def forward_gflops_per_image(model: MultiTaskModel, image_sizes: Mapping[str, int]) -> dict[str, float]:
    """{task: forward GFLOPs of one image, backbone + head} as `moevit plan` counts them, for each task of
    `image_sizes` ({task: square image side}). `model` must be whole: under expert parallelism, count
    before the engine shards the experts."""
    gflops = {}
    for task, side in image_sizes.items():
        backbone = analytic_flops(model.backbone, side, task)["gflops"]
        # head_cost's bytes argument only sizes activations; the multiply-adds do not depend on it.
        head = head_cost(model.heads[task], model.backbone, (side, side), FP32_BYTES)
        gflops[task] = backbone + 2 * head.macs / 1e9
    return gflops


def training_flops(images: Mapping[str, int], gflops_per_image: Mapping[str, float]) -> float:
    """FLOPs of training on `images` ({task: images over all ranks}): 3 x forward (Kaplan et al. 2020)."""
    return TRAIN_FLOPS_PER_FORWARD * sum(n * gflops_per_image[task] * 1e9 for task, n in images.items())


def model_flops_utilization(flops: float, seconds: float, world_size: int, peak_tflops: float) -> float:
    """MFU of `flops` model FLOPs done in `seconds` of wall time by `world_size` devices of
    `peak_tflops` each: a fraction in [0, 1] for a sane measurement."""
    return flops / (seconds * world_size * peak_tflops * 1e12)
