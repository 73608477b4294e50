"""Replace unreadable samples by their next readable neighbour, so batches stay full.

Dropping a corrupt sample would shorten one rank's batch (or epoch) and leave expert-parallel ranks
running different numbers of MoE forwards, which hangs their all-to-all. ``SkipCorrupt`` instead
substitutes index i+1, i+2, ... (modulo the length): the substitution depends only on which files are
corrupt, so it is the same on every run and every rank.

DataLoader workers are separate processes, so a counter kept here would never reach the trainer.
Each returned sample therefore carries ``"num_skipped"``: how many corrupt samples were passed over
to produce it. The collate functions sum it into the batch, from where it reaches the metrics.
"""

from __future__ import annotations

import logging

from torch.utils.data import Dataset

from moevit.data.errors import CorruptSampleError, TooManyCorruptSamplesError

logger = logging.getLogger(__name__)


class SkipCorrupt(Dataset):
    """Wraps a reader whose ``__getitem__`` may raise ``CorruptSampleError``.

    Args:
        dataset: a map-style dataset returning sample dicts.
        max_tries: how many consecutive indices to try before giving up (capped at the dataset length).

    Attributes:
        num_skipped: corrupt samples met by this process (each worker keeps its own).
        logged_paths: paths already reported by this process; each path is logged once.

    Raises (from ``__getitem__``):
        TooManyCorruptSamplesError: ``max_tries`` consecutive samples were all corrupt.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 32) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        self.dataset = dataset
        self.max_tries = max_tries
        self.num_skipped = 0
        self.logged_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        length = len(self.dataset)
        tries = min(self.max_tries, length)
        last_error: CorruptSampleError | None = None
        for offset in range(tries):
            try:
                sample = self.dataset[(index + offset) % length]
            except CorruptSampleError as err:
                self._record(err)
                last_error = err
                continue
            sample["num_skipped"] = offset
            return sample
        raise TooManyCorruptSamplesError(
            f"samples {index} to {(index + tries - 1) % length} (of {length}) are all unreadable; "
            f"the last one: {last_error}. The dataset is probably damaged or not in the expected format."
        )

    def _record(self, error: CorruptSampleError) -> None:
        self.num_skipped += 1
        if error.path not in self.logged_paths:
            self.logged_paths.add(error.path)
            logger.warning("skipping corrupt sample %s: %s", error.path, error.reason)

    def __getattr__(self, name: str):
        # Readers' metadata (classes, coco, cat_id_to_label, ...) stays reachable through the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
