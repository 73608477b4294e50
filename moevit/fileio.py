"""Writing small files so that a crash never leaves half of one behind."""

from __future__ import annotations

import os
from pathlib import Path


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
