"""Optional Weights & Biases logging: every metrics.jsonl record also goes to a wandb run (rank 0).

Used only when the config asks for it (`train.wandb.enabled`); `wandb` is imported only then, so a
run without it never needs the package. Asking for it without the package installed is a ConfigError
before training starts (`check_wandb_available`, called by the training preflight). Values are named as
in TensorBoard (``train/<task>/<key>``, ``train/<key>``, ``eval/<task>/<metric>``) at the record's step.
A resumed run starts a new wandb run whose steps continue from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

from moevit.config.errors import ConfigError
from moevit.config.schema import Config


def wandb_installed() -> bool:
    # sys.modules first: a module already imported (or injected, as tests do) may have no spec.
    return "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None


def check_wandb_available(cfg: Config, source: str = "config") -> None:
    """Refuses a config that asks for wandb logging when the `wandb` package is not installed."""
    if cfg.train.wandb.enabled and not wandb_installed():
        raise ConfigError(
            source,
            "'train.wandb.enabled' is true but the wandb package is not installed "
            "(pip install wandb, or set train.wandb.enabled=false)",
        )


class WandbSink:
    """A RunLogger sink (moevit.train.logging.MetricSink) writing to one wandb run.

    Args:
        cfg: the run's config: `train.wandb` picks project, name and mode; the whole config is stored as
            the wandb run's config.
        run_dir: the moevit run dir; wandb keeps its files (offline runs included) under it.
    """

    def __init__(self, cfg: Config, run_dir: Path):
        settings = cfg.train.wandb
        self._wandb = importlib.import_module("wandb")
        self._run = self._wandb.init(
            project=settings.project,
            name=settings.name,
            mode=settings.mode,
            dir=str(run_dir),
            config=dataclasses.asdict(cfg),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()
