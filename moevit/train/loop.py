"""The training loop: set up, (resume), then per step: plan -> step -> balance -> log -> eval -> checkpoint.

Every rank runs the same steps, evaluations and checkpoints at the same points: all of them are
collectives (MoE all-to-alls, all-reduces, DeepSpeed's checkpoint barriers). The order of set-up follows
torchtitan: check everything, then start the process group, then parallelise the single-device model.
`run_evaluation` evaluates a saved checkpoint without an engine or optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from moevit.artifacts.checkpoints import resolve_checkpoint, resolve_resume
from moevit.artifacts.model_dir import is_pruned_dir, load_pruned
from moevit.artifacts.run_dir import RunDir, check_output_dir, prepare_run_dir
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.data.multitask import derive_seed
from moevit.eval import evaluate
from moevit.fileio import write_text_atomically
from moevit.parallel.checkpoint import (
    capture_rng_state,
    consolidated_state_dict,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from moevit.parallel.collectives import all_reduce_sum, barrier, is_main_process
from moevit.parallel.engine import build_engine
from moevit.parallel.env import detect_environment
from moevit.parallel.expert_parallel import apply_expert_parallel
from moevit.parallel.setup import device_for, initialize_distributed
from moevit.train.balancing import build_balancer
from moevit.train.loader import build_train_loader
from moevit.train.logging import RunLogger
from moevit.train.preemption import Preemption
from moevit.train.preflight import build_checked_model
from moevit.train.resources import RESOURCES_FILE, peak_memory_over_ranks
from moevit.train.step import MultiTaskStep
from moevit.train.usage_plots import ExpertUsage, write_usage_report


def seed_rank(seed: int, rank: int) -> None:
    """Distinct streams per rank for augmentation and dropout (model init used the shared `seed`)."""
    rank_seed = derive_seed(seed, "train", rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def is_due(step: int, every: int, last_step: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


def skipped_samples_over_ranks(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    """Each rank's loader counts its own corrupt samples; the run reports their sum."""
    summed = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=device))
    return {task: round(total) for task, total in zip(counts, summed.tolist())}


def evaluate_model(model: torch.nn.Module, cfg: Config, rank: int, world_size: int, device: torch.device):
    return evaluate(model, cfg, None, cfg.train.eval_batches, rank, world_size, device)


def run_training(
    cfg: Config, resume: str | None = None, source: str = "config", model: torch.nn.Module | None = None
) -> dict[str, dict[str, float]]:
    """Trains `cfg` on the processes of this launch; returns the final evaluation's {task: {metric: value}},
    empty when a signal stopped the run before its last step (moevit.train.preemption).

    Args:
        cfg: the loaded config.
        resume: None (fresh run), "auto" (newest complete checkpoint of `cfg.output_dir`, if any), or a
            run dir or checkpoint directory to continue from.
        source: where `cfg` came from, for error messages.
        model: a prebuilt single-device model to train instead of the config's (fine-tuning,
            moevit.finetune; continual learning, moevit.continual.start); parameters with
            requires_grad False stay out of the optimizer.
    """
    run = RunDir(Path(cfg.output_dir))
    check_output_dir(cfg, resume)
    checkpoint = resolve_resume(resume, run.root)
    if model is None:
        model = build_checked_model(cfg, detect_environment().world_size, source)
    train_cfg = cfg.training_view()  # the tasks that train; evaluation keeps all of cfg's
    env = initialize_distributed(cfg)
    device = device_for(env)
    engine = build_engine(model, cfg, env)  # shards the experts over parallel.ep_size ranks first
    seed_rank(cfg.seed, env.rank)
    loader = build_train_loader(train_cfg, env.rank, env.world_size)
    balancer = build_balancer(
        cfg.train.loss_balancing, {n: t.loss_weight for n, t in train_cfg.tasks.items()}
    )
    usage = ExpertUsage(list(train_cfg.tasks))
    if is_main_process():
        prepare_run_dir(cfg)
    barrier()

    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint.run_root, checkpoint.tag)
        start_step = state["step"]
        loader.load_state_dict(state["loader"])
        balancer.load_state_dict(state["balancer"])
        usage.load_state_dict(state["usage"])
        restore_rng_state(state["rng"])

    train_step = MultiTaskStep(
        engine,
        list(train_cfg.tasks),
        cfg.aux_loss,
        loader.expected_ratios(),
        env.world_size,
        device,
        max_bad_steps=cfg.train.max_bad_steps,
    )
    if checkpoint is not None and "nonfinite" in state:
        train_step.load_state_dict(state["nonfinite"])
    if checkpoint is not None and "task_expert_mass" in state:  # absent from checkpoints before it existed
        train_step.task_expert_mass.load_state_dict(state["task_expert_mass"])
    last = cfg.train.steps
    logger = RunLogger(run.metrics_file, run.tb, last, start_step, cfg.train.log_every, is_main_process())
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint.directory} at step {start_step}")
    metrics: dict[str, dict[str, float]] = {}
    # Caught from here on (USR2: checkpoint and requeue; SIGTERM: checkpoint and exit), not during set-up:
    # a set-up error then leaves no handler behind in a process that goes on (tests, notebooks).
    preemption = Preemption.install()
    try:
        for step in range(start_step + 1, last + 1):
            started = time.perf_counter()
            result = train_step(next(loader), balancer.weights(), step)
            if not result.skipped:  # a NaN/inf step updated nothing; its losses would poison the balancer
                balancer.update({task: values["loss"] for task, values in result.task_losses.items()})
                usage.add(result.expert_counts)
            skipped = skipped_samples_over_ranks(loader.skipped_counts(), device)
            logger.log_step(step, result, engine.get_lr()[0], time.perf_counter() - started, skipped)
            if is_due(step, cfg.train.eval_every, last):
                metrics = evaluate_model(engine.module, cfg, env.rank, env.world_size, device)
                logger.log_eval(step, metrics)
                report = usage.reduce_and_reset(step, device)
                if is_main_process():
                    write_usage_report(run.plots, report)
            stopping = step < last and preemption.agreed(device)  # collective: same answer on every rank
            if stopping or is_due(step, cfg.train.checkpoint_every, last):
                client_state = {
                    "step": step,
                    "loader": loader.state_dict(),
                    "rng": capture_rng_state(),
                    "balancer": balancer.state_dict(),
                    "usage": usage.state_dict(),
                    "nonfinite": train_step.state_dict(),
                    "task_expert_mass": train_step.task_expert_mass.state_dict(),
                }
                save_checkpoint(engine, run.root, step, client_state, cfg.train.keep_last)
            if stopping:
                logger.message(preemption.describe(step))
                metrics = {}  # an earlier evaluation is not the result of the run
                break
    except BaseException:  # an error in the loop: no requeue, and no handler left behind
        preemption.restore()
        raise
    peak_memory = peak_memory_over_ranks(device)
    if is_main_process():
        write_text_atomically(run.root / RESOURCES_FILE, json.dumps(peak_memory) + "\n")
    logger.close()
    loader.close()
    preemption.finish()  # after USR2, rank 0 requeues the SLURM job; otherwise restores the handlers
    return metrics


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
            model.to(device), cfg, manifest.tasks, cfg.train.eval_batches, env.rank, env.world_size, device
        )
    ref = resolve_checkpoint(checkpoint, "--checkpoint")
    model = build_checked_model(cfg, detect_environment().world_size, source)
    model.load_state_dict(consolidated_state_dict(ref.directory))
    env = initialize_distributed(cfg)
    device = device_for(env)
    apply_expert_parallel(model, cfg.parallel.ep_size)
    return evaluate_model(model.to(device), cfg, env.rank, env.world_size, device)
