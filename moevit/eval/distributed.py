"""Evaluation across ranks: padded per-rank splits, per-sample records, and their deduplicated merge.

Every rank of an expert-parallel group must run the same number of forwards, or the all-to-all
exchanges hang. So evaluation splits the dataset the way ``torch.utils.data.DistributedSampler``
does (``moevit.data.sampler``): in order, padded by wrap-around to a multiple of the world size,
rank ``r`` taking every ``world_size``-th index from ``r`` (for a shard directory, the ``r``-th
contiguous block instead, so each rank reads its own shards). The padding repeats real samples, and
``SkipCorrupt`` may repeat one too (an unreadable sample is replaced by its next neighbour).

Metrics therefore keep one record per sample, keyed by a sample id (the sample's ``key``, or the
COCO image id), and the first record of an id wins: a repeat, on this rank or another, adds
nothing. ``sync()`` all-gathers the records of every rank when ``torch.distributed`` is initialized
and merges them in rank order, so every rank then computes the same numbers; in a single process it
does nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from moevit.data.sampler import ResumableDistributedSampler, ShardOrderSampler
from moevit.parallel.collectives import all_gather_objects


def padded_rank_indices(
    dataset_size: int, rank: int, world_size: int, shard_sizes: tuple[int, ...] | None = None
) -> list[int]:
    """This rank's dataset indices in order: ``ceil(dataset_size / world_size)`` of them on every rank.

    With ``shard_sizes`` (a shard directory), rank ``r`` takes the contiguous block ``r`` of the padded
    order instead of a strided slice, so ranks open disjoint shards (but the ones at block edges).
    """
    if shard_sizes is not None:
        if sum(shard_sizes) != dataset_size:
            raise ValueError(f"shard sizes sum to {sum(shard_sizes)}, not the dataset's {dataset_size}")
        sampler = ShardOrderSampler(shard_sizes, rank=rank, world_size=world_size, shuffle=False)
    else:
        sampler = ResumableDistributedSampler(dataset_size, rank=rank, world_size=world_size, shuffle=False)
    return sampler.epoch_indices(0).tolist()


def rank_batches(indices: list[int], batch_size: int, max_batches: int | None) -> list[list[int]]:
    """``indices`` cut into batches of ``batch_size`` (the last may be shorter), at most ``max_batches``.

    Every rank has as many indices as the others, so every rank gets as many batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    return batches if max_batches is None else batches[:max_batches]


class DedupedMetric:
    """Base of the metrics: one record per sample id; repeats of an id are not counted again.

    Subclasses turn a batch into ``(sample_id, record)`` pairs passed to ``_add``, and compute their
    metric from ``self._records.values()``. Records must be picklable (they travel between ranks).
    """

    def __init__(self) -> None:
        self._records: dict[Hashable, Any] = {}

    @property
    def num_samples(self) -> int:
        """Distinct samples recorded so far."""
        return len(self._records)

    def _add(self, sample_ids: Iterable[Hashable], records: Iterable[Any]) -> None:
        for sample_id, record in zip(sample_ids, records, strict=True):
            self._records.setdefault(sample_id, record)

    def state_dict(self) -> dict[Hashable, Any]:
        """The per-sample records (a copy), keyed by sample id."""
        return dict(self._records)

    def merge_state(self, state: Mapping[Hashable, Any]) -> None:
        """Adds another metric's records; ids already recorded keep their record."""
        self._add(state.keys(), state.values())

    def sync(self) -> None:
        """Merges every rank's records into this one's (a collective: every rank must call it)."""
        states = all_gather_objects(self._records)
        self._records = {}
        for state in states:
            self.merge_state(state)

    def _check_not_empty(self) -> None:
        if not self._records:
            raise ValueError(f"{type(self).__name__}.compute(): no sample was evaluated (call update first)")


def sample_ids(batch: Mapping[str, Any], key: str, batch_size: int, where: str) -> list[Hashable]:
    """``batch[key]`` checked to hold one id per sample (``keys`` or ``image_ids``)."""
    if key not in batch:
        raise KeyError(
            f"{where}: the batch has no {key!r} entry to identify samples (it has {sorted(batch)})"
        )
    ids = list(batch[key])
    if len(ids) != batch_size or any(sample_id is None for sample_id in ids):
        raise ValueError(f"{where}: batch[{key!r}] must hold {batch_size} ids, none of them None; got {ids}")
    return ids
