"""How many epochs of each task's training set a config's schedule covers.

For a task t trained with per-rank micro-batch ``b_t`` on ``W`` data-parallel ranks (the world size:
every rank reads its own samples, moevit.data.multitask), the run draws

    samples_t = b_t x W x steps_t,        epochs_t = samples_t / |train split of t|

where ``steps_t`` is the number of optimizer steps that train t. The schedule decides it
(moevit.data.schedule): every step under ``"all"``; every T-th step under ``"round_robin"``; under
``"weighted"`` the steps the schedule's seeded draw gives t, whose mean is ``p_t x steps`` (the
step probabilities ``TaskSchedule.step_probabilities``). The count comes from
``TaskSchedule.task_counts`` over the run's steps ``[0, train.steps)``, so it is the run's own draw,
not an estimate, and all three strategies take the same path.

Dataset sizes: the length of the train split when its root exists (the readers only list files or
read COCO's annotation JSON; nothing is decoded), else the real dataset's published train size,
flagged ``nominal``. One function (`epochs_covered`) serves `moevit plan` and the training start
(moevit.train.loop), which passes the sizes of the datasets it already built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moevit.config.schema import Config, DatasetConfig
from moevit.data.schedule import build_schedule

# Published train-split sizes: ILSVRC-2012 CLS-LOC train, COCO train2017 images, ADEChallengeData2016
# training images.
NOMINAL_TRAIN_SIZES = {"imagenet": 1_281_167, "coco": 118_287, "ade20k": 20_210}


@dataclass(frozen=True)
class DatasetSize:
    images: int
    nominal: bool  # True: the published size of the real dataset, the root was not found


@dataclass(frozen=True)
class TaskCoverage:
    steps: int  # optimizer steps that train the task
    samples: int  # batch_size x grad_accum_steps x world_size x steps
    dataset_size: DatasetSize
    epochs: float

    def describe(self, task: str) -> str:
        """One line for a log: `task: E epochs of N train images (samples over steps)`."""
        nominal = ", nominal size: root not found" if self.dataset_size.nominal else ""
        return (
            f"{task}: {self.epochs:.2f} epochs of {self.dataset_size.images:,} train images{nominal} "
            f"({self.samples:,} samples over {self.steps:,} steps)"
        )


def train_split_size(data: DatasetConfig) -> DatasetSize:
    """The number of images in `data`'s train split, or the format's nominal size if its root is missing.

    A root that exists but is laid out wrongly raises the reader's DatasetLayoutError: a plan should
    not quietly fall back to a size the run will not see.
    """
    if not Path(data.root).exists():
        return DatasetSize(NOMINAL_TRAIN_SIZES[data.format], nominal=True)
    from moevit.data.build import open_reader  # the readers pull in decoding and transforms: only when needed

    return DatasetSize(len(open_reader(data, data.train_split)), nominal=False)


def epochs_covered(
    cfg: Config, world_size: int, dataset_sizes: Mapping[str, int] | None = None
) -> dict[str, TaskCoverage]:
    """{task: TaskCoverage} for the training tasks of `cfg` on `world_size` data-parallel ranks.

    Args:
        cfg: the config; its tasks must all have a dataset (the training view of a run).
        world_size: data-parallel ranks (the GPUs of the job).
        dataset_sizes: measured train-split sizes (what a running job's loader holds); tasks left out
            are sized by `train_split_size`.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
    sizes: dict[str, DatasetSize] = {}
    for name, task in cfg.tasks.items():
        if task.data is None:
            raise ValueError(f"task {name!r} has no dataset: there is nothing to count epochs of")
        given = (dataset_sizes or {}).get(name)
        sizes[name] = DatasetSize(given, nominal=False) if given is not None else train_split_size(task.data)
    schedule = build_schedule(cfg, {name: size.images for name, size in sizes.items()})
    # The loop trains steps 1..train.steps on the schedule's steps 0..train.steps-1.
    steps = schedule.task_counts(cfg.train.steps)
    coverage = {}
    for name, task in cfg.tasks.items():
        samples = task.data.batch_size * cfg.train.grad_accum_steps * world_size * steps[name]
        coverage[name] = TaskCoverage(steps[name], samples, sizes[name], samples / sizes[name].images)
    return coverage
