"""Mixed precision of a run: the DeepSpeed config sections of each precision and the TF32 switch.

parallel.precision (resolved by moevit.parallel.layout.resolve_precision) picks one of three paths:

- fp32: nothing enabled.
- bf16: DeepSpeed's `torch_autocast`. Parameters, gradients, optimizer state and gradient reduction
  stay fp32; matmuls and convolutions run in bf16 under torch.autocast; the routers force fp32 themselves.
  bf16 has fp32's exponent range, so no loss scaling is needed.
- fp16 (CUDA only): DeepSpeed's `fp16` section. fp16's exponent range is small: gradients of small
  losses underflow to zero, so the loss is multiplied by a scale before the backward and the gradients
  divided by it before the update. DeepSpeed's dynamic loss scaler starts at 2**initial_scale_power,
  halves the scale on a step whose gradients overflow (the step is skipped, on every rank: the overflow
  flag is all-reduced, over the expert-parallel group too) once `hysteresis` overflows have been seen,
  and doubles it after `loss_scale_window` steps without one, never below `min_loss_scale`. The values
  below are DeepSpeed's documented defaults, written out so the config says what runs. DeepSpeed keeps
  fp16 weights for the forward and backward and fp32 master weights in its optimizer wrapper (ZeRO 0:
  FP16_UnfusedOptimizer around torch's AdamW; ZeRO 1/2: the ZeRO optimizer); `auto_cast` casts the
  floating tensors of the batch to fp16 on the way in. DeepSpeed's own torch_autocast path with fp16
  uses torch's GradScaler instead, whose overflow decision is per rank (ranks holding different experts
  could disagree and diverge), and it is left off.

TF32 (CUDA, Ampere and later): fp32 matmuls and convolutions use TensorFloat-32 tensor cores (10-bit
mantissa inputs, fp32 accumulation), several times faster than full fp32 at a precision that training
tolerates; this matters for the fp32 parts under bf16 (routers, losses) and for fp32 runs.
"""

from __future__ import annotations

import torch

# DeepSpeed's defaults (deepspeed.runtime.precision_config.DeepSpeedFP16Config).
FP16_DYNAMIC_LOSS_SCALING = {
    "loss_scale": 0,  # 0: dynamic loss scaling
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "consecutive_hysteresis": False,
    "min_loss_scale": 1,
}


def deepspeed_precision_sections(dtype: torch.dtype) -> dict:
    """The `torch_autocast` and `fp16` sections of the DeepSpeed config for a compute dtype."""
    return {
        # An empty module list keeps every gradient reduction in fp32.
        "torch_autocast": {
            "enabled": dtype == torch.bfloat16,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        "fp16": {"enabled": True, "auto_cast": True, **FP16_DYNAMIC_LOSS_SCALING}
        if dtype == torch.float16
        else {"enabled": False},
    }


def enable_tf32(cuda: bool) -> bool:
    """Let fp32 matmuls and cuDNN convolutions use TF32 when running on CUDA; returns whether it did.

    A no-op on the CPU (`cuda` False), where the settings would mean nothing, so CPU numbers stay
    exact fp32. Uses torch's per-backend `fp32_precision` settings: mixing them with the legacy
    `allow_tf32` flags makes torch refuse to report the precision.
    """
    if not cuda:
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True
