"""The run directory of a training run (`output_dir`):

    config.yaml      the resolved config (every default filled in), rewritten on resume
    metrics.jsonl    train and eval records (moevit.train.logging)
    tb/              TensorBoard events
    checkpoints/     DeepSpeed checkpoints and their client state (moevit.parallel.checkpoint)
    plots/           expert-usage JSON and heatmaps (moevit.train.usage_plots)

Created only after the config passed every check (moevit.train.preflight), so a refused config leaves
nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moevit.config import save_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.parallel.checkpoint import checkpoint_root


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return checkpoint_root(self.root)  # the checkpoint writer's name for it

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def check_output_dir(cfg: Config, resume: str | None) -> None:
    """Refuses a fresh run (`resume` None) into a directory that already holds checkpoints: it would mix
    two runs' records and let a later `--resume auto` pick the wrong run's checkpoint."""
    checkpoints = RunDir(Path(cfg.output_dir)).checkpoints
    if resume is None and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(
            f"output_dir={cfg.output_dir}",
            f"{checkpoints} already holds checkpoints; resume with `--resume auto`, or choose another "
            "output_dir (e.g. the override output_dir=runs/new)",
        )


def prepare_run_dir(cfg: Config) -> RunDir:
    """Creates (or reopens) `cfg.output_dir` with its subdirectories and writes the resolved config."""
    run = RunDir(Path(cfg.output_dir))
    for directory in (run.root, run.tb, run.checkpoints, run.plots):
        directory.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_file)
    return run
