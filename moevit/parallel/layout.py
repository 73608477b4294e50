"""The device layout a config asks for, checked and resolved without DeepSpeed or a process group.

Pure functions of the config and the world size, so a job can be refused (or sized by `moevit plan`)
before anything waits on a rendezvous, and without importing DeepSpeed (whose import logs to stdout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moevit.config.errors import ConfigError

if TYPE_CHECKING:
    from moevit.config.schema import Config

LAYOUT_SOURCE = "parallel layout"


def check_layout(cfg: Config, world_size: int, num_experts: int | None) -> None:
    """Raise ConfigError unless parallel.ep_size divides the world size and the expert count.

    Args:
        cfg: the run's config.
        world_size: processes in the job.
        num_experts: experts per MoE layer of the model to be built; None skips that check.
    """
    ep_size = cfg.parallel.ep_size
    if ep_size < 1:
        raise ConfigError(LAYOUT_SOURCE, f"parallel.ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ConfigError(
            LAYOUT_SOURCE,
            f"parallel.ep_size={ep_size} does not divide the world size {world_size} "
            f"(expert-parallel groups are {ep_size} consecutive ranks)",
        )
    if num_experts is not None and num_experts % ep_size:
        raise ConfigError(
            LAYOUT_SOURCE,
            f"parallel.ep_size={ep_size} does not divide the number of experts per MoE layer ({num_experts})",
        )
    if resolve_backend(cfg) == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            LAYOUT_SOURCE, "parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU"
        )


def resolve_backend(cfg: Config) -> str:
    """parallel.backend with "auto" resolved: nccl when CUDA is available, gloo otherwise."""
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config, cuda: bool | None = None) -> torch.dtype:
    """parallel.precision with "auto" resolved: bf16 on GPU, fp32 on CPU (see moevit.parallel.precision).

    fp16 is refused without CUDA: DeepSpeed's CPU accelerator supports fp16 only on CPUs with fp16
    oneDNN kernels, and on a CPU bf16 gives the same savings without loss scaling.

    Args:
        cfg: the run's config.
        cuda: whether this process computes on CUDA; None asks torch.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    precision = cfg.parallel.precision
    if precision == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if precision == "fp16" and not cuda:
        raise ConfigError(
            LAYOUT_SOURCE, "parallel.precision=fp16 needs CUDA devices; use bf16 (or auto, fp32) on CPU"
        )
    return PRECISION_DTYPES[precision]
