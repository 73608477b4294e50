"""Distributed training on DeepSpeed: the only package of moevit that imports deepspeed or builds
process groups.

- env: where this process sits in the job (launcher variables).
- setup: layout checks, process group and DeepSpeed expert groups, device and precision.
- expert_parallel: experts sharded over ranks, tokens exchanged with all_to_all_single.
- engine: the DeepSpeed engine (optimizer groups, LR schedule, ZeRO, precision, clipping).
- collectives: all-reduce / all-gather / barrier that also work in a single process.
- checkpoint: engine checkpoints plus per-rank JSON client state, committed atomically.
"""

from moevit.parallel.checkpoint import (
    capture_rng_state,
    consolidated_state_dict,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from moevit.parallel.collectives import all_gather_objects, all_reduce_sum, barrier, is_main_process
from moevit.parallel.engine import build_engine
from moevit.parallel.env import DistributedEnv, detect_environment
from moevit.parallel.expert_parallel import apply_expert_parallel, gather_single_device_state_dict
from moevit.parallel.setup import check_layout, device_for, initialize_distributed, resolve_precision

__all__ = [
    "DistributedEnv",
    "all_gather_objects",
    "all_reduce_sum",
    "apply_expert_parallel",
    "barrier",
    "build_engine",
    "capture_rng_state",
    "check_layout",
    "consolidated_state_dict",
    "detect_environment",
    "device_for",
    "find_latest_checkpoint",
    "gather_single_device_state_dict",
    "initialize_distributed",
    "is_main_process",
    "load_checkpoint",
    "restore_rng_state",
    "resolve_precision",
    "save_checkpoint",
]
