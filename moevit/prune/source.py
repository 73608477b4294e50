"""The source of a pruning: a training checkpoint's single-device model, its config and its usage.

Reading the checkpoint goes through moevit.parallel.checkpoint (consolidated weights, any ep_size);
everything after that (calibration, extraction, evaluation) runs in this one process without
DeepSpeed or a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moevit.artifacts.checkpoints import CheckpointRef, resolve_checkpoint
from moevit.artifacts.run_dir import RunDir
from moevit.artifacts.usage import Usage, has_counts, usage_from_run
from moevit.config import load_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.eval import evaluate
from moevit.factory import build_model
from moevit.models.multitask import MultiTaskModel
from moevit.parallel.checkpoint import consolidated_state_dict
from moevit.prune.extract import restricted_tasks
from moevit.prune.usage import calibrate_usage


@dataclass
class Source:
    cfg: Config
    model: MultiTaskModel  # eval mode, CPU
    state: dict[str, torch.Tensor]
    run_root: Path
    tag: str

    @property
    def description(self) -> str:
        return str(CheckpointRef(self.run_root, self.tag).directory)

    def image_sizes(self) -> dict[str, int]:
        return {name: task.image_size for name, task in self.cfg.tasks.items()}

    def top_k(self) -> dict[str, int]:
        return {name: layer.top_k for name, layer in self.model.backbone.mlp_layers().items()}

    def routable(self) -> dict[str, dict[str, int]]:
        """layer -> task -> n for the tasks restricted to a layer's first n experts (continual learning)."""
        return restricted_tasks(self.model.backbone)


def load_source(checkpoint: str, config: str | None = None, overrides: list[str] | None = None) -> Source:
    """A run dir (its newest checkpoint) or `<run>/checkpoints/<tag>`; the config defaults to the run's."""
    ref = resolve_checkpoint(checkpoint, "--checkpoint")
    config_path = Path(config) if config else RunDir(ref.run_root).config_file
    if not config_path.is_file():
        raise ConfigError(
            f"--config {config_path}", "no such file (the run dir's config.yaml is the default)"
        )
    cfg = load_config(config_path, overrides or [])
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(config_path), f"the model cannot be built: {err}") from None
    model.load_state_dict(consolidated_state_dict(ref.directory))
    # The model's own state, not the file's: keys older files hold and the model no longer has (the gates'
    # usage counters) were dropped by the load, so extraction and expansion map exactly the model's keys.
    return Source(cfg, model.eval(), model.state_dict(), ref.run_root, ref.tag)


def gather_usage(
    source: Source, tasks: list[str], mode: str = "calib", calib_batches: int = 20, calib_split: str = "train"
) -> tuple[Usage, str]:
    """(usage, where it came from). mode: "counters", "calib", or "auto" (counters when every task has
    some in every layer, else a calibration pass)."""
    if mode not in ("auto", "counters", "calib"):
        raise ValueError(f"--usage must be auto, counters or calib, got {mode!r}")
    if mode in ("auto", "counters"):
        usage, origin = usage_from_run(source.run_root, source.tag)
        if has_counts(usage, tasks):
            return usage, f"training counters: {origin}"
        if mode == "counters":
            raise ValueError(
                f"{source.description}: the run kept no usage counters for {tasks} ({origin}); "
                "use --usage calib --calib-batches N"
            )
    usage = calibrate_usage(source.model.backbone, source.cfg, tasks, calib_batches, calib_split)
    return (
        usage,
        f"calibration: {calib_batches} batches per task of the {calib_split} split (eval transforms)",
    )


def evaluate_on_cpu(model: MultiTaskModel, cfg: Config, tasks: list[str]) -> dict[str, dict[str, float]]:
    """The tasks' val metrics in this process (cfg.train.eval_batches caps the batches)."""
    return evaluate(model, cfg, tasks, cfg.train.eval_batches, 0, 1, "cpu")
