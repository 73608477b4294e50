"""Multi-task data loading: per-task resumable samplers driven by a :class:`TaskSchedule`.

Each step, :class:`MultiTaskLoader` asks the schedule which task(s) to train, pulls one batch of each (or
``accumulation`` batches of each: gradient accumulation, see :class:`StepPlan`)
from that task's own DataLoader and yields them as a :class:`StepPlan`, in the schedule's order. A
task's DataLoader is built on first use and only pulled when the schedule names the task, so a task
that is rarely drawn costs no work in between.

Expert parallelism without hangs
--------------------------------
Every rank of an expert-parallel group must run the same sequence of MoE forwards, since each MoE
layer call is an all-to-all collective. The loader guarantees the two things that sequence depends on:

- the same tasks per step on every rank: the schedule is a pure function of ``(seed, step)`` (see
  :mod:`moevit.data.schedule`) and all ranks count steps alike, so the number of micro-batches, hence
  of MoE layer calls, agrees at every step without communication;
- no rank runs out of data first: each task's stream is endless and every rank gets the same number
  of indices per epoch (padding as torch's DistributedSampler), so every rank always has a full batch.

The *samples* need not agree, and do not: ranks are data-parallel readers of disjoint slices of each
dataset (with DeepSpeed MoE every rank is a data-parallel rank for the dense weights, so pass the
global rank and world size). A dropless MoE layer exchanges per-expert token counts before the tokens,
so heterogeneous images per rank are fine; only the task plan must match.

Exact resume
------------
DataLoader workers prefetch, so a sampler's own position runs ahead of the trainer. The loader
therefore counts, per task, the samples the *trainer* has received, and ``state_dict()`` stores the
sampler state at that count. Nothing else is random: the schedule is pure, every epoch's permutation
is recomputed from ``(seed, task, epoch)``, and each DataLoader's worker seeds come from its own
generator seeded by ``(seed, task, rank)`` (so creating loaders lazily never consumes the global torch
RNG, which the trainer checkpoints). A new loader given the state replays the identical sample order.
The step and the sample positions are the same on every rank (ranks advance in lock step); only the
corrupt-sample counts below are per rank. Changing the schedule between runs is allowed (it continues
from the saved step with the new plan); changing a dataset's size, the world size or the seed is refused.

Corrupt samples: a skipping wrapper may mark a replacement sample with ``"num_skipped"`` (an int), and
a collate function may put ``"num_skipped"`` into a dict batch; the loader sums them per task into
:meth:`MultiTaskLoader.skipped_counts`, which is part of the state. They count this rank's data only:
sum them over ranks for metrics, and save every rank's state to restore them exactly.
"""

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from moevit.data.sampler import (
    ResumableBatchSampler,
    ResumableDistributedSampler,
    ShardOrderSampler,
    reshard_sampler_state,
)
from moevit.data.schedule import TaskSchedule
from moevit.data.seeding import SeededSamples, derive_seed


class TaskBatch(NamedTuple):
    task: str
    batch: Any


@dataclass(frozen=True)
class StepPlan:
    """The micro-batches of one optimizer step: `accumulation` rounds of one batch per task of the
    step, round after round, each in the schedule's order (`train.grad_accum_steps`)."""

    step: int
    batches: tuple[TaskBatch, ...]
    accumulation: int = 1

    def __post_init__(self):
        if self.accumulation < 1 or len(self.batches) % self.accumulation:
            raise ValueError(
                f"StepPlan: {len(self.batches)} batches do not split into {self.accumulation} equal rounds"
            )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this step trains (each once, in the schedule's order)."""
        return tuple(item.task for item in self.batches[: len(self.batches) // self.accumulation])

    def rounds(self) -> list["StepPlan"]:
        """The step's accumulation rounds, each a plan of one batch per task."""
        size = len(self.batches) // self.accumulation
        return [StepPlan(self.step, self.batches[i : i + size]) for i in range(0, len(self.batches), size)]

    def __iter__(self) -> Iterator[TaskBatch]:
        return iter(self.batches)


def count_skipped(batch: Any) -> int:
    """Corrupt samples reported by a batch: its ``"num_skipped"`` (an int or a tensor of per-sample
    counts) for a dict batch, the sum over elements for a list or tuple batch, else 0."""
    if isinstance(batch, Mapping):
        value = batch.get("num_skipped")
        return 0 if value is None else int(torch.as_tensor(value).sum())
    if isinstance(batch, (list, tuple)):
        return sum(count_skipped(element) for element in batch)
    return 0


def _task_sampler(
    dataset: Dataset, rank: int, world_size: int, shuffle: bool, seed: int
) -> ResumableDistributedSampler:
    """The task's index stream: a shard directory (a dataset with ``shard_sizes``, through its wrappers)
    is read shard by shard, each rank a contiguous block (:class:`ShardOrderSampler`); any other
    dataset as a permutation of its indices."""
    shard_sizes = getattr(dataset, "shard_sizes", None)
    if shard_sizes is not None:
        return ShardOrderSampler(shard_sizes, rank, world_size, shuffle, seed)
    return ResumableDistributedSampler(len(dataset), rank, world_size, shuffle, seed)


class MultiTaskLoader:
    """Endless iterator of :class:`StepPlan` over several datasets, with exact resume.

    Args:
        datasets: one map-style dataset per task of ``schedule``; one with a ``shard_sizes`` attribute
            (a shard directory, moevit.data.shards.indexed) is read shard by shard.
        batch_sizes: per-rank micro-batch size per task.
        collate_fns: collate function per task; ``None`` or a missing task uses torch's ``default_collate``.
        schedule: decides the tasks of every step; must be built identically on every rank.
        rank: this process's data-parallel rank (the global rank under DeepSpeed MoE).
        world_size: number of data-parallel ranks.
        seed: seed of the per-task sample orders; the same on every rank.
        shuffle: permute every epoch (``False`` for deterministic debugging).
        num_workers: DataLoader worker processes per task (so ``num_tasks x num_workers`` in total).
        persistent_workers: keep workers alive across DataLoader re-iteration.
        pin_memory: pin batches for faster host-to-device copies.
        prefetch_factor: batches prefetched per worker (``None``: torch's default).
        worker_init_fn: called in every worker with its id.
        accumulation: batches of each task per step (gradient accumulation): the step's tasks come from
            the schedule at the step's index, and round r takes the task's next batch, so a step reads
            the same samples, in the same order, as one batch of ``accumulation x batch_size`` would.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        batch_sizes: Mapping[str, int],
        collate_fns: Mapping[str, Callable[[list], Any]] | None,
        schedule: TaskSchedule,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        accumulation: int = 1,
    ):
        tasks = schedule.tasks
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"MultiTaskLoader: accumulation must be an int >= 1, got {accumulation!r}")
        _check_names("datasets", datasets, tasks)
        _check_names("batch_sizes", batch_sizes, tasks)
        collate_fns = dict(collate_fns or {})
        unknown = sorted(set(collate_fns) - set(tasks))
        if unknown:
            raise ValueError(
                f"MultiTaskLoader: collate_fns name unknown tasks {unknown}; tasks are {list(tasks)}"
            )
        for task in tasks:
            size = batch_sizes[task]
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"MultiTaskLoader: batch_sizes[{task!r}] must be an int > 0, got {size!r}")
            dataset = datasets[task]
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                raise TypeError(
                    f"MultiTaskLoader: dataset of task {task!r} must be map-style (__len__ and __getitem__), "
                    f"got {type(dataset).__name__}"
                )
            if len(dataset) == 0:
                raise ValueError(f"MultiTaskLoader: dataset of task {task!r} is empty")
        if num_workers < 0:
            raise ValueError(f"MultiTaskLoader: num_workers must be >= 0, got {num_workers}")
        if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
            raise ValueError("MultiTaskLoader: persistent_workers and prefetch_factor need num_workers > 0")

        self.schedule = schedule
        self.batch_sizes = dict(batch_sizes)
        self.accumulation = accumulation
        self.step = 0
        self._datasets = dict(datasets)
        self._collate_fns = {t: collate_fns.get(t, default_collate) for t in tasks}
        self._rank = rank
        self._seed = seed
        self._loader_options = {
            "num_workers": num_workers,
            "persistent_workers": persistent_workers,
            "pin_memory": pin_memory,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": worker_init_fn,
        }
        self._samplers = {
            t: _task_sampler(self._datasets[t], rank, world_size, shuffle, derive_seed(seed, t))
            for t in tasks
        }
        self._batch_iterators: dict[str, Iterator[Any]] = {}
        self._samples_consumed = dict.fromkeys(tasks, 0)
        self._skipped = dict.fromkeys(tasks, 0)

    def __iter__(self) -> "MultiTaskLoader":
        return self

    def __next__(self) -> StepPlan:
        tasks = self.schedule.tasks_at(self.step)
        batches = tuple(
            TaskBatch(t, next(self._batch_iterator(t))) for _ in range(self.accumulation) for t in tasks
        )
        for task, batch in batches:
            self._samples_consumed[task] += self.batch_sizes[task]
            self._skipped[task] += count_skipped(batch)
        plan = StepPlan(self.step, batches, self.accumulation)
        self.step += 1
        return plan

    def _batch_iterator(self, task: str) -> Iterator[Any]:
        if task not in self._batch_iterators:
            sampler = self._samplers[task]
            sampler.load_state_dict(sampler.state_at(self._samples_consumed[task]))
            # Each sample's augmentation is seeded by its place in the task's global stream (seeding.py):
            # what a worker, a rank or a resumed run draws for it is the same.
            loader = DataLoader(
                SeededSamples(self._datasets[task], derive_seed(self._seed, task, "augment")),
                batch_sampler=ResumableBatchSampler(sampler, self.batch_sizes[task], with_positions=True),
                collate_fn=self._collate_fns[task],
                generator=torch.Generator().manual_seed(derive_seed(self._seed, task, self._rank)),
                **self._loader_options,
            )
            self._batch_iterators[task] = iter(loader)
        return self._batch_iterators[task]

    def close(self) -> None:
        """Drop the DataLoader iterators, which stops their worker processes."""
        self._batch_iterators.clear()

    def dataset(self, task: str) -> Dataset:
        """`task`'s dataset (reader, training transforms, corrupt-sample skipping), for reads outside the
        training stream (moevit.train.router_calibration): reading it moves no sampler and counts nothing."""
        return self._datasets[task]

    def dataset_sizes(self) -> dict[str, int]:
        """Samples in each task's dataset (what one epoch of it is)."""
        return {t: len(self._datasets[t]) for t in self.schedule.tasks}

    def expected_ratios(self) -> dict[str, float]:
        """The schedule's expected fraction of training samples per task, with these batch sizes."""
        return self.schedule.expected_ratios(self.batch_sizes)

    def effective_ratios(self) -> dict[str, float]:
        """Observed fraction of training samples per task so far (all zero before the first step)."""
        total = sum(self._samples_consumed.values())
        return {t: (n / total if total else 0.0) for t, n in self._samples_consumed.items()}

    def skipped_counts(self) -> dict[str, int]:
        """Corrupt samples reported per task so far (including before a resume)."""
        return dict(self._skipped)

    def state_dict(self) -> dict[str, Any]:
        """Where the trainer is: the next step and, per task, the samples it received (with the
        matching sampler state) and the corrupt samples reported."""
        return {
            "step": self.step,
            "tasks": {
                t: {
                    "samples_consumed": self._samples_consumed[t],
                    "skipped": self._skipped[t],
                    "sampler": self._samplers[t].state_at(self._samples_consumed[t]),
                }
                for t in self.schedule.tasks
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the trainer that saved ``state`` stopped; restarts the DataLoaders."""
        if "step" not in state or "tasks" not in state:
            raise KeyError(f"multi-task loader state needs keys 'step' and 'tasks', got {sorted(state)}")
        _check_names("saved state tasks", state["tasks"], self.schedule.tasks)
        for task, saved in state["tasks"].items():
            sampler = self._samplers[task]
            try:
                sampler.load_state_dict(saved["sampler"])
            except (KeyError, ValueError) as error:
                raise ValueError(f"multi-task loader state, task {task!r}: {error}") from error
            if sampler.state_at(saved["samples_consumed"]) != saved["sampler"]:
                raise ValueError(
                    f"multi-task loader state, task {task!r}: samples_consumed {saved['samples_consumed']} "
                    f"disagrees with sampler state {saved['sampler']}"
                )
        self.close()
        self.step = state["step"]
        for task, saved in state["tasks"].items():
            self._samples_consumed[task] = saved["samples_consumed"]
            self._skipped[task] = saved["skipped"]


def _check_names(what: str, mapping: Mapping[str, Any], tasks: tuple[str, ...]) -> None:
    unknown = sorted(set(mapping) - set(tasks))
    missing = [t for t in tasks if t not in mapping]
    if unknown or missing:
        raise ValueError(
            f"MultiTaskLoader: {what} must name exactly the schedule's tasks {list(tasks)}; "
            f"unknown {unknown}, missing {missing}"
        )


def reshard_loader_states(old: list[dict], new_world: int) -> tuple[list[dict], list[str]]:
    """`MultiTaskLoader.state_dict()`s of every old rank, rewritten for `new_world` ranks (new rank q
    starts from old rank q mod W), and notes on what could not be kept exactly. Each task's sampler
    moves through the global sample stream (`reshard_sampler_state`); corrupt-sample counts move to
    rank 0, so their sum is kept."""
    notes = []
    new_states = [copy.deepcopy(old[rank % len(old)]) for rank in range(new_world)]
    for task, saved in old[0]["tasks"].items():
        sampler, consumed, exact = reshard_sampler_state(saved["sampler"], new_world)
        if not exact:
            notes.append(f"task {task}: the sample stream resumes at the start of epoch {sampler['epoch']}")
        skipped_total = sum(state["tasks"][task]["skipped"] for state in old)
        for rank, state in enumerate(new_states):
            task_state = state["tasks"][task]
            task_state.update(sampler=sampler, samples_consumed=consumed)
            task_state["skipped"] = skipped_total if rank == 0 else 0
    return new_states, notes
