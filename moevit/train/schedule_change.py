"""What a resume with another LR schedule means, said when the run starts.

The LR schedule (linear warmup, then cosine to min_lr at `train.steps`) is a function of the config, not
of the checkpoint: a resumed run follows the schedule its own config describes. Resuming with the same
config continues the interrupted run exactly. Resuming with a larger `train.steps` (the way to train a
finished run for longer) is allowed, but once the steps already taken left the warmup, they followed
another cosine than a straight run of the new length would have: the result then differs from that
run. The loop logs this note so that nobody reads such a continuation as the longer run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moevit.config.schema import Config, OptimConfig
from moevit.parallel.engine import warmup_cosine_factor

# The fields that define the schedule, in the resolved config.yaml a run dir holds.
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps")


def _factors(steps: int, warmup_steps: int, lr: float, min_lr: float, count: int) -> list[float]:
    return [lr * warmup_cosine_factor(s, warmup_steps, steps, min_lr / lr) for s in range(count)]


def read_train_section(config_file: Path) -> dict | None:
    """The `train` section of a run dir's resolved config.yaml, None when there is none. Read before the
    resumed run rewrites that file with its own config."""
    if not config_file.is_file():
        return None
    return (yaml.safe_load(config_file.read_text()) or {}).get("train") or {}


def schedule_change_note(train: dict | None, cfg: Config, start_step: int) -> str | None:
    """A one-line note when `cfg` (the resumed run) gives any of the `start_step` steps already taken
    another lr than the train section `train` of the checkpoint's run (read_train_section) did; None when
    they agree (the same schedule, or a longer one whose first `start_step` steps are the same, e.g. all
    inside the warmup) or when `train` is None (nothing to compare)."""
    if train is None:
        return None
    optim: OptimConfig = cfg.train.optim
    old_optim = {name: train.get("optim", {}).get(name, getattr(optim, name)) for name in SCHEDULE_FIELDS}
    old_steps = train.get("steps", cfg.train.steps)
    taken_then = _factors(
        old_steps, old_optim["warmup_steps"], old_optim["lr"], old_optim["min_lr"], start_step
    )
    taken_now = _factors(cfg.train.steps, optim.warmup_steps, optim.lr, optim.min_lr, start_step)
    if taken_then == taken_now:
        return None
    changed = [f"train.steps {old_steps} -> {cfg.train.steps}"] if old_steps != cfg.train.steps else []
    changed += [
        f"train.optim.{name} {old_optim[name]} -> {getattr(optim, name)}"
        for name in SCHEDULE_FIELDS
        if old_optim[name] != getattr(optim, name)
    ]
    return (
        f"LR schedule changed since the checkpoint ({', '.join(changed)}): from step {start_step + 1} the lr "
        f"follows the new schedule, but steps 1-{start_step} followed the old one, so this run is a "
        f"continuation, not the same as a run started with this config"
    )
