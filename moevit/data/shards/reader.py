"""Read a shard directory written by ``writer.py``: in order (evaluation) or resampled (training).

Both readers split the shards by rank explicitly, ``shards[rank::world_size]`` from the ``rank`` and
``world_size`` they are given (webdataset's default node splitter would read torch.distributed or the
RANK/WORLD_SIZE environment, which under DeepSpeed or a launcher may not be the data-parallel layout),
and decode with ``ShardSampleDecoder`` so every sample equals the folder reader's.

- :class:`ShardDataset`: every sample once, in the order written; DataLoader workers take every
  ``num_workers``-th shard of the rank's. Ranks may get different sample counts.
- :class:`ShardPipeline`: training batches. Each worker draws shards with replacement from its rank's
  shards (webdataset's ``resampled=True``), shuffles samples in a buffer, decodes, transforms and
  collates, and stops after its share of ``batches_per_epoch`` (webdataset's ``with_epoch``), so every
  rank yields exactly ``batches_per_epoch`` full batches, which expert-parallel ranks need to run the
  same number of MoE forwards. webdataset seeds resampling from the pid and the clock; here every
  random choice comes from ``(seed, epoch, rank, worker)``, so a run can be repeated exactly.

Resampling workers never run dry, so :class:`ShardPipeline` only needs a shard per rank; in order,
every DataLoader worker of every rank needs its own (``world_size x num_workers`` shards).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from moevit.data.collate import collate_for_task
from moevit.data.seeding import derive_seed
from moevit.data.shards.layout import ShardInfo
from moevit.data.shards.samples import ShardSampleDecoder, SkipCorruptStream
from moevit.data.transforms import build_transforms

DEFAULT_SHUFFLE_BUFFER = 1000


def _too_few_shards(info: ShardInfo, readers: int, who: str, remedy: str) -> ValueError:
    return ValueError(
        f"{info.directory} holds {len(info.shards)} shards, fewer than the {readers} {who} that each need "
        f"their own. Rewrite them with --shard-size <= {max(info.num_samples // readers, 1)} or use {remedy}."
    )


def _worker_position() -> tuple[int, int]:
    """(worker id, number of workers) of the current process; (0, 1) outside DataLoader workers."""
    worker_info = torch.utils.data.get_worker_info()
    if worker_info is None:
        return 0, 1
    return worker_info.id, worker_info.num_workers


def _raw_samples(shard_paths: Iterable[str]) -> Iterator[dict]:
    return wds.tarfile_to_samples()({"url": path} for path in shard_paths)


class _ShardReader(IterableDataset):
    """What both readers share: the info file, this rank's shards, decoding and the reader metadata."""

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        task_type: str | None,
        transform: Callable[[dict], dict] | None,
        reduce_zero_label: bool,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.info = ShardInfo.load(shard_dir)
        if task_type is not None and task_type != self.info.task_type:
            raise ValueError(
                f"{shard_dir} holds {self.info.dataset} shards ({self.info.task_type}), not {task_type} data"
            )
        if len(self.info.shards) < world_size:
            raise _too_few_shards(self.info, world_size, "ranks", "fewer ranks")
        self.rank, self.world_size = rank, world_size
        self.rank_shards = self.info.shard_paths[rank::world_size]
        self.transform = transform
        self.skip_corrupt = SkipCorruptStream(ShardSampleDecoder(self.info, reduce_zero_label))

    @property
    def task_type(self) -> str:
        return self.info.task_type

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def label_to_cat_id(self) -> list[int]:
        """COCO only: label -> COCO category id, for writing detections in COCO's ids."""
        if self.info.label_to_cat_id is None:
            raise AttributeError(f"{self.info.directory} holds {self.info.dataset} shards, not COCO")
        return list(self.info.label_to_cat_id)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return self.info.cat_id_to_label

    @property
    def annotation_file(self) -> Path:
        """COCO only: the source ``instances_*.json``, for COCOeval."""
        if self.info.annotation_file is None:
            raise AttributeError(f"{self.info.directory} holds {self.info.dataset} shards, not COCO")
        return Path(self.info.annotation_file)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples this process has skipped so far."""
        return self.skip_corrupt.num_skipped

    def _decoded(self, raw_samples: Iterator[dict]) -> Iterator[dict]:
        samples = self.skip_corrupt(raw_samples)
        return samples if self.transform is None else map(self.transform, samples)


class ShardDataset(_ShardReader):
    """Every sample of a shard directory once, decoded as the folder reader decodes it.

    In one process the order is the folder reader's (the order written), minus the files listed as
    missing in ``_info.json`` and minus corrupt samples. In a DataLoader with workers, worker ``w``
    reads the rank's shards ``w::num_workers`` and the loader interleaves them.

    Args:
        shard_dir: a directory written by ``write_shards``.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks; rank ``r`` reads shards ``r::world_size``.
        num_workers: workers of the DataLoader this dataset goes into (0: iterated in the main process).
        task_type: if given, the task type the shards must serve.
        transform: applied to every decoded sample dict (e.g. ``moevit.data.transforms.build_transforms``).
        reduce_zero_label: ADE20K only: mmsegmentation's label reduction, as ``moevit.data.ade20k.ADE20K``.

    Raises:
        DatasetLayoutError: the directory is not a complete shard directory.
        ValueError: fewer shards than ``world_size x max(num_workers, 1)``, or a ``task_type`` mismatch.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        task_type: str | None = None,
        transform: Callable[[dict], dict] | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        super().__init__(shard_dir, rank, world_size, task_type, transform, reduce_zero_label)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        readers = world_size * max(num_workers, 1)
        if len(self.info.shards) < readers:
            # Split, not resampled: a worker without a shard would read nothing.
            who = f"ranks x DataLoader workers = {world_size} x {max(num_workers, 1)}"
            raise _too_few_shards(self.info, readers, who, "fewer ranks or workers")
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_position()
        if num_workers > max(self.num_workers, 1):
            raise ValueError(
                f"ShardDataset built for num_workers={self.num_workers} runs in a DataLoader with "
                f"{num_workers} workers; build it with num_workers={num_workers} (the shard count is "
                "checked against it)"
            )
        return self._decoded(_raw_samples(self.rank_shards[worker::num_workers]))


class ShardPipeline(_ShardReader):
    """Endless-data training batches: resampled shards, shuffled samples, exactly ``len(self)`` batches.

    Use it as ``DataLoader(pipeline, batch_size=None, num_workers=...)``: whatever the number of
    workers, a rank yields ``len(pipeline)`` batches per epoch (each worker yields its share). Call
    :meth:`set_epoch` before iterating each epoch (with non-persistent workers) to draw new shards and
    orders; the same ``(seed, epoch)`` and number of workers replay the same samples on every run.

    Args:
        shard_dir: a directory written by ``write_shards``.
        batch_size: samples per batch; every batch is full.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks; rank ``r`` resamples from shards ``r::world_size``.
        seed: seed of the shard draws and the shuffle; the same on every rank.
        transform: applied to every decoded sample dict before batching.
        collate_fn: list of samples -> batch; default ``moevit.data.collate``'s for the task type.
        batches_per_epoch: batches every rank yields per epoch; default: enough for one pass over the
            data, ``ceil(num_samples / (world_size x batch_size))``.
        shuffle_buffer: raw (undecoded) samples held for shuffling per worker; the first batch waits for
            min(100, shuffle_buffer) of them (as webdataset). 1: no shuffling within shards.
        task_type: if given, the task type the shards must serve.
        reduce_zero_label: ADE20K only, as in :class:`ShardDataset`.

    Raises:
        DatasetLayoutError: the directory is not a complete shard directory.
        ValueError: fewer shards than ranks, bad sizes, or a ``task_type`` mismatch.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        transform: Callable[[dict], dict] | None = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        task_type: str | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        super().__init__(shard_dir, rank, world_size, task_type, transform, reduce_zero_label)
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(
                f"batch_size and shuffle_buffer must be >= 1, got {batch_size}, {shuffle_buffer}"
            )
        if batches_per_epoch is None:
            batches_per_epoch = -(-self.info.num_samples // (world_size * batch_size))
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.collate_fn = collate_fn or collate_for_task(self.info.task_type)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer

    def set_epoch(self, epoch: int) -> None:
        """Selects the shard draws and sample order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_position()
        stream_id = (self.seed, self.epoch, self.rank, worker)
        shard_rng = random.Random(derive_seed("shards", *stream_id))
        raw = _raw_samples(shard_rng.choice(self.rank_shards) for _ in itertools.count())
        if self.shuffle_buffer > 1:
            sample_rng = random.Random(derive_seed("samples", *stream_id))
            raw = wds.shuffle(self.shuffle_buffer, rng=sample_rng)(raw)
        samples = self._decoded(raw)
        # The DataLoader takes batches from its workers in turn: worker w yields its share of the epoch.
        share = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        # Batching with islice reads no sample past the last batch (webdataset's batched reads one
        # ahead), so every corrupt sample counted by this process is reported in a batch.
        for _ in range(share):
            yield self.collate_fn(list(itertools.islice(samples, self.batch_size)))


def build_shard_pipeline(
    shard_dir: str | os.PathLike,
    task_type: str,
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    batches_per_epoch: int | None = None,
) -> DataLoader:
    """The DataLoader of a shard directory with the task's transforms and collate function.

    Training (``train=True``): a :class:`ShardPipeline` (resampled, ``len(loader)`` full batches on
    every rank; ``loader.dataset.set_epoch(e)`` selects an epoch). Evaluation: a :class:`ShardDataset`
    batched in order, the last batch possibly short. Worker RNGs (the random transforms) are seeded
    from ``(seed, rank)``.

    Raises:
        DatasetLayoutError: not a complete shard directory.
        ValueError: shards of another task type, or too few shards for the ranks (and workers).
    """
    transform = build_transforms(task_type, train, image_size)
    generator = torch.Generator().manual_seed(derive_seed(seed, "shard transforms", rank))
    if not train:
        dataset = ShardDataset(shard_dir, rank, world_size, num_workers, task_type, transform)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_for_task(task_type),
            generator=generator,
        )
    pipeline = ShardPipeline(
        shard_dir,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        transform=transform,
        batches_per_epoch=batches_per_epoch,
        task_type=task_type,
    )
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=generator)
