"""The training data of a config: each task's train split behind one schedule-driven MultiTaskLoader."""

from __future__ import annotations

from moevit.config.schema import Config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.data.multitask import MultiTaskLoader
from moevit.data.schedule import build_schedule
from moevit.data.seeding import derive_seed
from moevit.data.workers import ignore_stop_signals


def build_train_loader(cfg: Config, rank: int, world_size: int, pin_memory: bool = False) -> MultiTaskLoader:
    """Every task's train split, read as `rank` of `world_size` data-parallel readers.

    Dataset layout errors (DatasetLayoutError) surface here, before the first step. `pin_memory`:
    collate into page-locked memory (for CUDA, see moevit.data.collate.pins_memory).
    """
    datasets = {name: build_dataset(task.type, task.data, train=True) for name, task in cfg.tasks.items()}
    schedule = build_schedule(cfg, {name: len(dataset) for name, dataset in datasets.items()})
    return MultiTaskLoader(
        datasets,
        batch_sizes={name: task.data.batch_size for name, task in cfg.tasks.items()},
        collate_fns={
            # Classification training may mix batches (Mixup/CutMix), seeded per task and batch.
            name: collate_for_task(
                task.type,
                task.data.transform_settings(),
                task.num_classes,
                derive_seed(cfg.seed, name, "mixup"),
            )
            for name, task in cfg.tasks.items()
        },
        schedule=schedule,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        num_workers=cfg.train.num_workers,
        worker_init_fn=ignore_stop_signals,  # the main process checkpoints on SIGTERM/USR2
        pin_memory=pin_memory,
        accumulation=cfg.train.grad_accum_steps,  # micro-batches per optimizer step, same tasks
    )
