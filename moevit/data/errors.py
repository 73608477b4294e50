"""Errors raised by the dataset readers.

Two kinds of bad input are kept apart because they are handled differently:

- ``DatasetLayoutError``: the dataset as a whole is not where or how it is expected (missing root,
  missing split folder, no class folders, an image without its annotation). Raised while a reader is
  constructed, before any training starts; it is never skipped.
- ``CorruptSampleError``: one sample cannot be read (truncated or unreadable image, a file that an
  annotation refers to is missing). Raised from ``__getitem__``; ``moevit.data.skip.SkipCorrupt``
  replaces such samples so batches stay full.
"""

from __future__ import annotations


class DatasetLayoutError(ValueError):
    """The dataset root does not have the expected layout; the message names the path and the layout."""


class CorruptSampleError(Exception):
    """One sample cannot be read.

    Args:
        path: the file that could not be read (or the sample key when the bytes came from a shard).
        reason: what went wrong, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        # Both values go to Exception.__init__ so that pickling (DataLoader workers) rebuilds the error.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class TooManyCorruptSamplesError(RuntimeError):
    """Every substitute tried for a corrupt sample was corrupt as well; the dataset is likely broken."""
