"""Endless, resumable, distributed index sampler over a map-style dataset.

Same split as ``torch.utils.data.DistributedSampler``: in epoch ``e`` the indices ``0..N-1`` are
permuted by a generator seeded from ``(seed, e)`` (identity with ``shuffle=False``), padded by wrapping
around to a multiple of ``world_size``, and rank ``r`` takes the strided slice ``r::world_size``. Ranks
therefore read disjoint samples (up to the padding) and the same number of them per epoch.

Unlike torch's sampler, the stream is endless (epoch ``e + 1`` follows epoch ``e`` without a
``set_epoch`` call) and its position is state: ``state_dict()`` holds the epoch and the position within
this rank's slice of it, and ``load_state_dict()`` jumps there directly, because every epoch's order is
recomputed from ``(seed, epoch)`` and nothing from earlier epochs needs replaying. The position is the
same on every rank (ranks advance in lock step), so one rank's state restores them all.

:class:`ResumableBatchSampler` groups the stream into lists of ``batch_size`` indices, to be passed as
a DataLoader's ``batch_sampler``. Batches run across epoch boundaries, so every batch is full.

:class:`ShardOrderSampler` is the same stream for a shard directory (moevit.data.shards.indexed): an
epoch is one permutation of the shards, and each rank reads a contiguous block of it, so a rank opens
about ``1 / world_size`` of the shards instead of touching every one.
"""

from collections.abc import Iterator
from itertools import islice

import numpy as np

from moevit.data.seeding import derive_seed

_GEOMETRY_KEYS = ("dataset_size", "world_size", "shuffle", "seed")
INDEX_ORDER, SHARD_ORDER = "indices", "shard_blocks"  # the `order` of a sampler state (absent: indices)


class ResumableDistributedSampler:
    """Yields this rank's dataset indices forever, epoch after epoch, from a restorable position.

    A DataLoader draws indices ahead of the trainer (prefetching), so ``state_dict()`` describes what
    was *drawn*; a trainer that must resume from what it *consumed* computes that state with
    :meth:`state_at`. Only one iterator should be active at a time: ``iter()`` continues from the
    current position.

    Args:
        dataset_size: number of samples N of the dataset (> 0).
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks that split the dataset.
        shuffle: permute each epoch; ``False`` walks the indices in order.
        seed: seed of the per-epoch permutations; every rank must use the same one.
    """

    order = INDEX_ORDER
    geometry_keys = _GEOMETRY_KEYS

    def __init__(
        self, dataset_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0
    ):
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size <= 0:
            raise ValueError(
                f"ResumableDistributedSampler: dataset_size must be an int > 0, got {dataset_size!r}"
            )
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(
                f"ResumableDistributedSampler: world_size must be an int > 0, got {world_size!r}"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"ResumableDistributedSampler: rank must be in [0, {world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"ResumableDistributedSampler: seed must be an int >= 0, got {seed!r}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        # Each rank gets ceil(N / world_size) indices per epoch; the short ranks are padded by wrapping.
        self.samples_per_epoch = -(-dataset_size // world_size)
        self._offset = 0
        self._cached_epoch = -1
        self._cached_indices = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._offset // self.samples_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in the order they are yielded."""
        if epoch != self._cached_epoch:
            # np.resize repeats the array cyclically: the padding torch's DistributedSampler adds.
            padded = np.resize(self.epoch_order(epoch), self.samples_per_epoch * self.world_size)
            self._cached_indices = self._rank_slice(padded)
            self._cached_epoch = epoch
        return self._cached_indices

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch`` in their global order, before padding."""
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
        return np.arange(self.dataset_size)

    def _rank_slice(self, padded: np.ndarray) -> np.ndarray:
        return padded[self.rank :: self.world_size]

    def _global_position(self, local: int) -> int:
        """Where this rank's ``local``-th sample of an epoch stands in the epoch's padded global order."""
        return local * self.world_size + self.rank

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.iter_with_positions():
            yield index

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """(index, position in the global sample stream) pairs: the stream every rank reads a strided
        slice of, epoch after epoch (padded to a multiple of the world size). A sample's position is the
        same whichever rank or worker reads it, which is what its augmentation is seeded by
        (moevit.data.seeding)."""
        while True:
            epoch, position = divmod(self._offset, self.samples_per_epoch)
            epoch_start = epoch * self.samples_per_epoch * self.world_size
            for local, index in enumerate(self.epoch_indices(epoch)[position:].tolist(), start=position):
                self._offset += 1
                yield index, epoch_start + self._global_position(local)

    def state_at(self, num_samples: int) -> dict[str, int | bool]:
        """The state after ``num_samples`` indices have been drawn from the start of the stream."""
        if num_samples < 0:
            raise ValueError(f"state_at needs num_samples >= 0, got {num_samples}")
        epoch, position = divmod(num_samples, self.samples_per_epoch)
        return {
            "epoch": epoch,
            "position": position,
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, int | bool]:
        """Epoch and position of the next index, with the geometry they are valid for."""
        return self.state_at(self._offset)

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from a saved state; it must come from a sampler with the same geometry."""
        missing = [k for k in ("epoch", "position", *self.geometry_keys) if k not in state]
        if missing:
            raise KeyError(f"sampler state lacks keys {missing}; got keys {sorted(state)}")
        mismatched = {
            k: (state[k], getattr(self, k))
            for k in (*self.geometry_keys, "order")
            if state.get(k, "indices") != getattr(self, k)
        }
        if mismatched:
            details = ", ".join(
                f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in mismatched.items()
            )
            raise ValueError(
                f"sampler state does not fit this sampler ({details}); the saved order cannot be resumed"
            )
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or not 0 <= position < self.samples_per_epoch:
            raise ValueError(
                f"sampler state out of range: epoch {epoch} (>= 0), position {position} "
                f"(in [0, {self.samples_per_epoch}))"
            )
        self._offset = epoch * self.samples_per_epoch + position


SHARDS_PER_WINDOW = 16


class ShardOrderSampler(ResumableDistributedSampler):
    """The resumable stream of a shard directory's samples (indices in the order written).

    Epoch ``e``'s global order is the shards permuted by a generator seeded from ``(seed, e)``, cut
    into windows of ``shards_per_window`` consecutive shards of that permutation; each window's samples
    come together, permuted across the window's shards from ``(seed, e, window)`` (``shuffle=False``:
    everything in the order written). A window plays the part of a shuffle buffer that mixes several
    shards, which matters because ``moevit data shard`` writes in the folder reader's order (ImageNet:
    class by class), so one shard alone may hold a single class; unlike a buffer, the window is a pure
    function of the epoch and needs no state to resume. The order is padded at its tail by repeating its
    start, as the index sampler's, and rank ``r`` reads the contiguous block ``[r L, (r + 1) L)``,
    ``L = ceil(N / world)``: the same number of samples on every rank, from about ``1 / world`` of the
    shards. A sample's stream position is its place in the epoch's padded global order, whichever rank
    or worker reads it.

    Args:
        shard_sizes: samples per shard, in the directory's order.
        rank, world_size, shuffle, seed: as :class:`ResumableDistributedSampler`.
        shards_per_window: shards whose samples are shuffled together.
    """

    order = SHARD_ORDER
    geometry_keys = (*_GEOMETRY_KEYS, "shard_layout")

    def __init__(
        self,
        shard_sizes: tuple[int, ...],
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shards_per_window: int = SHARDS_PER_WINDOW,
    ):
        if not shard_sizes or any(size < 1 for size in shard_sizes):
            raise ValueError(f"ShardOrderSampler: shard sizes must be >= 1, got {list(shard_sizes)[:10]}")
        if shards_per_window < 1:
            raise ValueError(f"ShardOrderSampler: shards_per_window must be >= 1, got {shards_per_window}")
        super().__init__(sum(shard_sizes), rank, world_size, shuffle, seed)
        self.shard_sizes = tuple(int(size) for size in shard_sizes)
        self.shards_per_window = shards_per_window
        self._shard_starts = np.cumsum((0, *self.shard_sizes[:-1]))
        # Rewritten shards (another --shard-size) or another window give another order: a state must
        # not resume across that.
        self.shard_layout = derive_seed(*self.shard_sizes, "window", shards_per_window)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_sizes))
        windows = []
        for window, first in enumerate(range(0, len(shards), self.shards_per_window)):
            samples = np.concatenate(
                [
                    np.arange(self._shard_starts[shard], self._shard_starts[shard] + self.shard_sizes[shard])
                    for shard in shards[first : first + self.shards_per_window]
                ]
            )
            windows.append(np.random.default_rng([self.seed, epoch, window]).permutation(samples))
        return np.concatenate(windows)

    def _rank_slice(self, padded: np.ndarray) -> np.ndarray:
        start = self.rank * self.samples_per_epoch
        return padded[start : start + self.samples_per_epoch]

    def _global_position(self, local: int) -> int:
        return self.rank * self.samples_per_epoch + local

    def state_at(self, num_samples: int) -> dict[str, int | bool | str]:
        return {**super().state_at(num_samples), "order": self.order, "shard_layout": self.shard_layout}


class ResumableBatchSampler:
    """Endless batches of ``batch_size`` indices from a :class:`ResumableDistributedSampler`.

    Its state is the sampler's: positions are counted in samples, so a state saved with one batch
    size can be resumed with another.

    Args:
        sampler: the index stream to group.
        batch_size: indices per batch (> 0).
        with_positions: yield (index, stream position) pairs instead of indices (for
            moevit.data.seeding.SeededSamples).
    """

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int, with_positions: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"ResumableBatchSampler: batch_size must be an int > 0, got {batch_size!r}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.with_positions = with_positions

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        keys = self.sampler.iter_with_positions() if self.with_positions else iter(self.sampler)
        while True:
            yield list(islice(keys, self.batch_size))


def reshard_sampler_state(saved: dict, new_world: int) -> tuple[dict, int, bool]:
    """A saved sampler state moved to `new_world` ranks reading the same global sample stream: (state,
    samples consumed by the new rank, exact?).

    Ranks read strided slices of one permutation per epoch, so the position converts through the
    samples all ranks read together. Exact when the dataset and the samples read divide evenly over
    both world sizes; otherwise the rest of the epoch is skipped (the stream restarts at the next one).
    """
    old_world, size = saved["world_size"], saved["dataset_size"]
    new_per_epoch = -(-size // new_world)
    epoch, position = saved["epoch"], saved["position"]
    read = position * old_world  # samples of this epoch read by all ranks together
    if saved.get("order", INDEX_ORDER) == SHARD_ORDER:
        # Shard ranks read contiguous blocks: what they read together is no prefix of the epoch's
        # order, so no position of a new rank layout continues it.
        exact = position == 0
    else:
        exact = position == 0 or (size % old_world == 0 and size % new_world == 0 and read % new_world == 0)
    if exact:
        position = read // new_world  # < new_per_epoch, since read < size
    else:
        epoch, position = epoch + 1, 0
    return (
        {**saved, "epoch": epoch, "position": position, "world_size": new_world},
        epoch * new_per_epoch + position,
        exact,
    )
