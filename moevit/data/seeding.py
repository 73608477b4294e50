"""Augmentation randomness that belongs to the sample, not to the process that drew it.

A training sample's random crops and flips are drawn from RNGs seeded by a pure function of (the run's
seed, the task, the sample's position in the task's global sample stream). They therefore do not depend
on which DataLoader worker or rank drew the sample, on how many workers there are, or on what came
before it, and a run resumed from a checkpoint (moevit.data.multitask) draws exactly what an
uninterrupted run would, whatever `train.num_workers` is before or after the resume.

The position, not the dataset index: the padded sampler repeats indices at an epoch's tail, and a
corrupt sample is replaced by its neighbour (moevit.data.skip), so one index can stand at several
positions, each with its own draw.

Dict samples also carry their position (``STREAM_POSITION``), so that randomness drawn for a whole batch
after collation (Mixup/CutMix, moevit.data.mixup) can be seeded the same way, by the batch's first
position.

Every generator a transform may use is seeded: torch's (torchvision's transforms), Python's `random`
and NumPy's global one. Their states are restored after the sample, so with `num_workers: 0` the main
process's streams (dropout, the checkpointed RNG state) are not disturbed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

STREAM_POSITION = "stream_position"  # the key SeededSamples adds to dict samples


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints and strings, stable across processes and Python runs
    (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """torch, `random` and NumPy seeded with `seed` inside the block, their states restored after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededSamples(Dataset):
    """A map-style dataset read by stream position: item `(index, position)` is `dataset[index]` drawn
    under RNGs seeded from (`seed`, position); a dict sample gets its position as `STREAM_POSITION`.

    Args:
        dataset: the task's dataset (reader, transforms, corrupt-sample skipping).
        seed: the task's augmentation seed (the run's seed and the task, derived).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        with seeded_rngs(derive_seed(self.seed, position)):
            sample = self.dataset[index]
        if isinstance(sample, dict):
            sample = {**sample, STREAM_POSITION: position}
        return sample
