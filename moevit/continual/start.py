"""How `moevit train` runs a continual config (one with a `continual:` section, written by `moevit expand`).

- `check_continual`: the init dir holds the expanded weights and agrees with the section, before the
  process group starts (the config itself checks the section's task names: evaluating or pruning a
  finished run needs no init dir);
- `start_continual`: the config's model takes the expanded weights (model.init's loader,
  moevit.artifacts.init, in its strict mode: a key-by-key load) and is frozen (freeze.py); `moevit
  train` hands it to the training loop as a prebuilt model, before the engine shards its experts and
  builds the optimizer. Only `Config.train_tasks()` train; evaluation
  keeps every task, so the old tasks are still measured.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moevit.artifacts.init import apply_init
from moevit.artifacts.model_dir import WEIGHTS_FILE, read_continual_record
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.continual.freeze import freeze_for_continual


def check_continual(cfg: Config, source: str = "config") -> None:
    """Raises ConfigError unless the `continual` section can start a training run (reads the manifest only)."""
    spec = cfg.continual
    if spec is None:
        return
    if spec.init is None:
        raise ConfigError(source, "'continual.init': name the `moevit expand --out` directory to start from")
    init = Path(spec.init)
    if not (init / WEIGHTS_FILE).is_file():
        raise ConfigError(
            source, f"'continual.init': {init} holds no {WEIGHTS_FILE} (a `moevit expand` output)"
        )
    record = read_continual_record(init)
    expected = {"frozen_experts": record["frozen_experts"], "task_experts": record["task_experts"]}
    found = {"frozen_experts": spec.frozen_experts, "task_experts": dict(spec.task_experts)}
    if expected != found:
        raise ConfigError(
            source, f"'continual' says {found}, but {init} was expanded with {expected}; use its config.yaml"
        )


def start_continual(model: nn.Module, cfg: Config, source: str = "config") -> dict[str, int]:
    """Loads the expanded weights into `model` (built from `cfg`) and freezes it; returns the counts."""
    check_continual(cfg, source)
    spec = cfg.continual
    # model.init's loader, strict: every tensor key by key, no resampling, so the old tasks stay bit-exact.
    apply_init(model, spec.init, strict=True, flag="continual.init")
    return freeze_for_continual(model, cfg.train_tasks(), spec.frozen_experts, spec.train_shared)
