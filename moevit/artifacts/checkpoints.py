"""Which checkpoint a path means: the one resolver of every command that reads a training checkpoint
(`train --resume`, `eval`, `prune`, `expand`, `finetune`'s export, `ckpt reshard`).

A path is either a run dir, meaning its newest complete checkpoint, or a checkpoint directory
`<run>/checkpoints/<tag>`, which must itself be complete. "Complete" is the checkpoint writer's word
(moevit.parallel.checkpoint: every rank saved, then the marker file was written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moevit.artifacts.run_dir import RunDir
from moevit.config.errors import ConfigError
from moevit.parallel.checkpoint import find_latest_checkpoint, is_complete_checkpoint


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: the run dir that holds it and its tag (`step_<n>`)."""

    run_root: Path
    tag: str

    @property
    def directory(self) -> Path:
        return RunDir(self.run_root).checkpoints / self.tag


def resolve_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> CheckpointRef:
    """The checkpoint `path` names; ConfigError naming `flag` and the path when it names none."""
    path = Path(path)
    if RunDir(path).checkpoints.is_dir():
        tag = find_latest_checkpoint(path)
        if tag is None:
            raise ConfigError(f"{flag} {path}", "the run dir holds no complete checkpoint")
        return CheckpointRef(path, tag)
    if path.parent.name == RunDir(Path()).checkpoints.name and is_complete_checkpoint(path):
        return CheckpointRef(path.parent.parent, path.name)
    raise ConfigError(f"{flag} {path}", "neither a run dir nor a complete checkpoint <run>/checkpoints/<tag>")


def resolve_resume(resume: str | None, run_root: Path) -> CheckpointRef | None:
    """`--resume`: None (a fresh run), "auto" (the newest complete checkpoint of `run_root`, None when
    there is none yet), or any path `resolve_checkpoint` takes."""
    if resume is None:
        return None
    if resume == "auto":
        tag = find_latest_checkpoint(run_root)
        return None if tag is None else CheckpointRef(run_root, tag)
    return resolve_checkpoint(resume, "--resume")
