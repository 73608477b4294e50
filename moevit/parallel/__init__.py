"""Distributed training on DeepSpeed: the only package of moevit that imports deepspeed or builds
process groups.

- env: where this process sits in the job (launcher variables).
- setup: layout checks, process group and DeepSpeed expert groups, device and precision.
- expert_parallel: experts sharded over ranks, tokens exchanged with all_to_all_single.
- engine: the DeepSpeed engine (optimizer groups, LR schedule, ZeRO, precision, clipping).
- collectives: all-reduce / all-gather / barrier that also work in a single process.
- checkpoint: engine checkpoints plus per-rank JSON client state, committed atomically.
"""

from importlib import import_module

# Names re-exported lazily (PEP 562): importing a submodule without DeepSpeed in it (env, ckpt_cli, which
# the CLI's argument parser needs) must not import deepspeed, which is slow and prints to stdout.
_EXPORTS = {
    "capture_rng_state": "checkpoint",
    "consolidated_state_dict": "checkpoint",
    "find_latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "restore_rng_state": "checkpoint",
    "save_checkpoint": "checkpoint",
    "all_gather_objects": "collectives",
    "all_reduce_sum": "collectives",
    "barrier": "collectives",
    "is_main_process": "collectives",
    "build_engine": "engine",
    "DistributedEnv": "env",
    "detect_environment": "env",
    "apply_expert_parallel": "expert_parallel",
    "gather_single_device_state_dict": "expert_parallel",
    "check_layout": "setup",
    "device_for": "setup",
    "initialize_distributed": "setup",
    "resolve_precision": "setup",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


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
