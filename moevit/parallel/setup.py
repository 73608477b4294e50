"""Starting the process group and DeepSpeed's expert-parallel groups; device and precision choice
(fp16 refused without CUDA; TF32 matmuls on CUDA, moevit.parallel.precision).

Order at start-up: `check_layout` (moevit.parallel.layout: pure arithmetic, raises before anything
waits on a rendezvous) -> `initialize_distributed` -> build the model -> `moevit.parallel.engine.build_engine`.

Groups (DeepSpeed's `utils.groups`, "E + D" layout, for world size W and ep_size P):
- expert-parallel group `ep_size_P`: P consecutive ranks [kP, (k+1)P) that together hold one
  copy of every expert and exchange tokens with all-to-all;
- expert-data-parallel group `ep_size_P`: the W/P ranks holding the same experts (ranks with
  the same index modulo P); expert gradients are averaged over it;
- dense parameters are averaged over all W ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

from moevit.parallel.env import DistributedEnv, detect_environment
from moevit.parallel.layout import check_layout, resolve_backend, resolve_precision
from moevit.parallel.precision import enable_tf32

if TYPE_CHECKING:
    from moevit.config.schema import Config

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's name for its CPU shared-memory all-reduce op
DEFAULT_TIMEOUT = timedelta(minutes=30)  # a first NCCL/GLOO collective may wait on a slow rank's data loading


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel and expert-data-parallel groups of this size."""
    return f"ep_size_{ep_size}"


def device_for(env: DistributedEnv) -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def initialize_distributed(cfg: Config, timeout: timedelta = DEFAULT_TIMEOUT) -> DistributedEnv:
    """Start the process group (also for a single process: DeepSpeed's engine needs one) and
    create DeepSpeed's expert-parallel and expert-data-parallel groups for parallel.ep_size.

    Args:
        cfg: the run's config (parallel.ep_size, parallel.backend).
        timeout: how long a collective may wait before it fails instead of hanging.
    """
    env = detect_environment()
    check_layout(cfg, env.world_size, num_experts=None)
    resolve_precision(cfg)  # fp16 without CUDA is refused here, before any rendezvous or compute
    enable_tf32(torch.cuda.is_available())
    # env:// rendezvous reads these; a process started without a launcher has none of them.
    for name, value in env.as_environment().items():
        os.environ.setdefault(name, value)
    backend = resolve_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    skip_inference_comm_op()
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timeout,
        rank=env.rank,
        world_size=env.world_size,
    )
    ensure_expert_groups(cfg.parallel.ep_size)
    return env


def shutdown_distributed() -> None:
    """Waits for every rank, then destroys the process groups; for the end of a command's worker process.

    Left to the interpreter's exit, gloo's groups are torn down in whatever order objects die; one rank of
    a finished 2-process SLURM job was seen to abort there ("terminate called without an active
    exception"), which turned a completed run into a failed job.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    DeepSpeed's torch backend builds that op at start-up when it is "compatible" (~100 s of C++
    compilation on a fresh machine, then cached), but only `inference_all_reduce` uses it; training
    never does. DeepSpeed keeps the compatibility table as one editable dict for this purpose.
    """
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def ensure_expert_groups(ep_size: int) -> None:
    """Create DeepSpeed's groups for `ep_size` unless they exist (every rank must call this)."""
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
