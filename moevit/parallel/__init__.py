"""Distributed training on DeepSpeed: the only package of moevit that imports deepspeed or builds
process groups.

- env: where this process sits in the job (launcher variables).
- layout: the layout checks and the backend and precision choice (no DeepSpeed import).
- setup: process group and DeepSpeed expert groups, device.
- expert_parallel: experts sharded over ranks, tokens exchanged with all_to_all_single.
- engine: the DeepSpeed engine (optimizer groups, LR schedule, ZeRO, precision, clipping).
- collectives: all-reduce / all-gather / barrier that also work in a single process.
- checkpoint: engine checkpoints plus per-rank JSON client state, committed atomically.
"""
