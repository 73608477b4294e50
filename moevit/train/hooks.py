"""The loop's periodic pieces: each is a small object whose `after_step` the loop calls, in the manner
of detectron2's hooks (without a runner that owns the loop).

- `EvaluationHook`: every task's val metrics every `train.eval_every` steps and at the last step, then
  the expert-usage report of the window since the previous evaluation (moevit.train.usage_plots).
- `CheckpointHook`: a checkpoint every `train.checkpoint_every` steps, at the last step, and whenever
  the loop is told to stop (preemption).

Both are collectives (evaluation runs MoE all-to-alls, checkpoints have barriers): every rank calls
them at the same steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moevit.config.schema import Config
from moevit.eval import evaluate
from moevit.parallel.checkpoint import save_checkpoint
from moevit.parallel.collectives import is_main_process
from moevit.parallel.env import DistributedEnv
from moevit.parallel.layout import resolve_precision
from moevit.train.logging import RunLogger
from moevit.train.state import TrainState
from moevit.train.usage_plots import ExpertUsage, write_usage_report


def is_due(step: int, every: int, last_step: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


class EvaluationHook:
    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        usage: ExpertUsage,
        plots_dir: Path,
        logger: RunLogger,
        env: DistributedEnv,
        device: torch.device,
    ):
        self.cfg, self.model, self.usage, self.plots_dir = cfg, model, usage, plots_dir
        self.logger, self.env, self.device = logger, env, device

    def after_step(self, step: int) -> dict[str, dict[str, float]] | None:
        """{task: {metric: value}} when this step evaluated, else None."""
        if not is_due(step, self.cfg.train.eval_every, self.cfg.train.steps):
            return None
        metrics = evaluate(
            self.model,
            self.cfg,
            None,
            self.cfg.train.eval_batches,
            self.env.rank,
            self.env.world_size,
            self.device,
            resolve_precision(self.cfg),  # the autocast training runs under
        )
        self.logger.log_eval(step, metrics)
        report = self.usage.reduce_and_reset(step, self.device)
        if is_main_process():
            write_usage_report(self.plots_dir, report)
        return metrics


class CheckpointHook:
    def __init__(self, engine, state: TrainState, run_root: Path, cfg: Config):
        self.engine, self.state, self.run_root, self.cfg = engine, state, run_root, cfg

    def after_step(self, step: int, stopping: bool = False) -> None:
        if stopping or is_due(step, self.cfg.train.checkpoint_every, self.cfg.train.steps):
            client_state = self.state.client_state(step)
            save_checkpoint(self.engine, self.run_root, step, client_state, self.cfg.train.keep_last)
