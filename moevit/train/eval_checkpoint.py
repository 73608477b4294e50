"""`moevit eval`: evaluates a saved checkpoint or a standalone model directory, without an engine or
optimizer."""

from __future__ import annotations

import dataclasses

from moevit.artifacts.checkpoints import resolve_checkpoint
from moevit.artifacts.model_dir import is_pruned_dir, load_pruned
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.eval import evaluate
from moevit.parallel.checkpoint import consolidated_state_dict
from moevit.parallel.env import detect_environment
from moevit.parallel.expert_parallel import apply_expert_parallel
from moevit.parallel.layout import resolve_precision
from moevit.parallel.setup import device_for, initialize_distributed
from moevit.train.preflight import build_checked_model


def run_evaluation(cfg: Config, checkpoint: str, source: str = "config") -> dict[str, dict[str, float]]:
    """Evaluates a checkpoint (a run dir: its newest; or `<run>/checkpoints/<tag>`) on every task.

    The weights come consolidated (moevit.parallel.checkpoint), so any process count and ep_size works,
    whatever the training layout was. A pruned model directory (`moevit prune`, holding manifest.json) is
    evaluated on its own tasks, data-parallel only (its experts stay whole on every process).
    """
    if is_pruned_dir(checkpoint):
        model, manifest = load_pruned(checkpoint)
        missing = [task for task in manifest.tasks if task not in cfg.tasks]
        if missing:
            raise ConfigError(source, f"the pruned model's task(s) {missing} have no entry under 'tasks'")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_size=1))
        env = initialize_distributed(cfg)
        device = device_for(env)
        return evaluate(
            model.to(device),
            cfg,
            manifest.tasks,
            cfg.train.eval_batches,
            env.rank,
            env.world_size,
            device,
            resolve_precision(cfg),
        )
    ref = resolve_checkpoint(checkpoint, "--checkpoint")
    model = build_checked_model(cfg, detect_environment().world_size, source)
    model.load_state_dict(consolidated_state_dict(ref.directory))
    env = initialize_distributed(cfg)
    device = device_for(env)
    apply_expert_parallel(model, cfg.parallel.ep_size)
    return evaluate(
        model.to(device),
        cfg,
        None,
        cfg.train.eval_batches,
        env.rank,
        env.world_size,
        device,
        resolve_precision(cfg),  # under the autocast of training (parallel.precision)
    )
