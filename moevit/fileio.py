"""File-level pieces every package may use: writing small files so that a crash never leaves half of one
behind, and the error for a checkpoint file that holds more than tensors."""

from __future__ import annotations

import os
from pathlib import Path


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors, containers and plain values (e.g. a pickle payload).
    Defined here, below every package, so the CLI can catch it without importing DeepSpeed."""


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` in one step: write a temporary sibling, fsync, `os.replace`.

    Readers see the old content or the new, never a partial file; the temporary file is removed
    if anything fails. Used for configs, checkpoint pointers and dataset markers.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
