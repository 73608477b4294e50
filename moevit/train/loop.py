"""The training loop: set up, (resume), then per step: train -> evaluate -> checkpoint.

Every rank runs the same steps, evaluations and checkpoints at the same points: all of them are
collectives (MoE all-to-alls, all-reduces, DeepSpeed's checkpoint barriers). The order of set-up follows
torchtitan: check everything, then start the process group, then parallelise the single-device model.
The loop's state is moevit.train.state, its periodic pieces moevit.train.hooks.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from moevit.artifacts.checkpoints import resolve_resume
from moevit.artifacts.init import write_init_report
from moevit.artifacts.run_dir import RunDir, check_output_dir, prepare_run_dir
from moevit.config.schema import Config
from moevit.data.coverage import epochs_covered
from moevit.data.multitask import MultiTaskLoader, StepPlan
from moevit.data.seeding import derive_seed
from moevit.fileio import write_text_atomically
from moevit.models.moe_vit import set_activation_checkpointing
from moevit.parallel.checkpoint import load_checkpoint
from moevit.parallel.collectives import barrier, is_main_process
from moevit.parallel.engine import build_engine
from moevit.parallel.env import detect_environment
from moevit.parallel.layout import resolve_precision
from moevit.parallel.setup import device_for, initialize_distributed
from moevit.train.hooks import CheckpointHook, EvaluationHook
from moevit.train.logging import RunLogger
from moevit.train.mfu import forward_gflops_per_image, run_peak_tflops
from moevit.train.preemption import Preemption
from moevit.train.preflight import build_checked_model, start_from_init
from moevit.train.resources import RESOURCES_FILE, peak_memory_over_ranks
from moevit.train.router_calibration import calibrate_routing
from moevit.train.schedule_change import read_train_section, schedule_change_note
from moevit.train.state import TrainState, build_train_state
from moevit.train.throughput import Throughput
from moevit.train.wandb_sink import WandbSink, check_wandb_available


def seed_rank(seed: int, rank: int) -> None:
    """Distinct streams per rank for augmentation and dropout (model init used the shared `seed`)."""
    rank_seed = derive_seed(seed, "train", rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def loader_counts(skipped: dict[str, int], plan: StepPlan, device: torch.device) -> torch.Tensor:
    """This rank's corrupt samples so far (its loader counts its own) and this step's images per task
    (`plan`; a rank's batch may be short), flat float64 on `device`: what the step sums over ranks with
    its own figures (see `summed_loader_counts`)."""
    images = dict.fromkeys(skipped, 0)
    for task, batch in plan:
        images[task] += batch["images"].shape[0]
    return torch.tensor([*skipped.values(), *images.values()], dtype=torch.float64, device=device)


def summed_loader_counts(tasks: list[str], summed: list[float]) -> tuple[dict[str, int], dict[str, int]]:
    """({task: corrupt samples}, {task: images}) over all ranks, from the sums of `loader_counts`."""
    totals = [round(total) for total in summed]
    return dict(zip(tasks, totals[: len(tasks)])), dict(zip(tasks, totals[len(tasks) :]))


def coverage_lines(train_cfg: Config, loader: MultiTaskLoader, world_size: int) -> list[str]:
    """One line per training task: the epochs of its train split that the whole run covers (the count
    `moevit plan` prints, here with the sizes of the datasets the loader holds)."""
    coverage = epochs_covered(train_cfg, world_size, loader.dataset_sizes())
    return [f"epochs covered by {train_cfg.train.steps} steps: " + c.describe(t) for t, c in coverage.items()]


def train_one_step(state: TrainState, engine, logger: RunLogger, step: int, device: torch.device) -> None:
    started = time.perf_counter()
    plan = next(state.loader)
    data_wait = time.perf_counter() - started  # the main process idle until the workers hand a batch
    skipped = state.loader.skipped_counts()
    # The loader's counts ride on the step's one all-reduce (no collective and host sync of their own).
    result = state.train_step(plan, state.balancer.weights(), step, loader_counts(skipped, plan, device))
    if not result.skipped:  # a NaN/inf step updated nothing; its losses would poison the balancer
        state.balancer.update({task: values["loss"] for task, values in result.task_losses.items()})
        state.usage.add(result.expert_counts)
    skipped, task_images = summed_loader_counts(list(skipped), result.also_summed)
    seconds = time.perf_counter() - started
    logger.log_step(step, result, engine.get_lr()[0], seconds, skipped, data_wait, task_images)


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
    check_wandb_available(cfg, source)
    checkpoint = resolve_resume(resume, run.root)
    # The checkpoint's schedule, read before prepare_run_dir rewrites config.yaml with this run's config.
    previous_train = read_train_section(RunDir(checkpoint.run_root).config_file) if checkpoint else None
    if model is None:
        model = build_checked_model(cfg, detect_environment().world_size, source)
    # model.init on every rank, before the engine shards the experts; a resumed run's checkpoint
    # replaces every weight, so the init file is not read (nor needed) again.
    init_report = start_from_init(model, cfg) if checkpoint is None else None
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    # Counted on the whole model: the engine shards the experts under expert parallelism.
    gflops = forward_gflops_per_image(
        model, {name: t.image_size for name, t in cfg.training_view().tasks.items()}
    )
    env = initialize_distributed(cfg)
    device = device_for(env)
    engine = build_engine(model, cfg, env)  # shards the experts over parallel.ep_size ranks first
    seed_rank(cfg.seed, env.rank)
    state = build_train_state(cfg.training_view(), engine, env, device)  # evaluation keeps every task
    if is_main_process():
        prepare_run_dir(cfg)
    barrier()
    start_step = 0
    calibration = []
    if checkpoint is not None:
        start_step = state.restore(load_checkpoint(engine, checkpoint.run_root, checkpoint.tag))
    else:  # a resumed run's biases come with its checkpoint
        calibration = calibrate_routing(
            engine.module,
            state.loader,
            list(cfg.training_view().tasks),
            cfg.train.router_calibration_images,
            cfg.seed,
            device,
            resolve_precision(cfg),  # the autocast training runs under
        )

    last = cfg.train.steps
    peak, peak_line = run_peak_tflops(cfg, device)
    throughput = Throughput(last, env.world_size, gflops, peak)
    sinks = [WandbSink(cfg, run.root)] if is_main_process() and cfg.train.wandb.enabled else []
    logger = RunLogger(
        run.metrics_file, run.tb, last, start_step, cfg.train.log_every, is_main_process(), throughput, sinks
    )
    if is_main_process():
        logger.message(peak_line)
        for line in coverage_lines(cfg.training_view(), state.loader, env.world_size):
            logger.message(line)
    if checkpoint is not None:
        logger.message(f"resumed from {checkpoint.directory} at step {start_step}")
        note = schedule_change_note(previous_train, cfg, start_step)
        if note is not None:
            logger.message(note)
    if is_main_process():
        for task_calibration in calibration:
            logger.message(task_calibration.describe())
    if init_report is not None and is_main_process():
        write_init_report(run.root, init_report)
        logger.message(init_report.summary() + f" (details: {run.root / 'init_report.json'})")
    evaluation = EvaluationHook(cfg, engine.module, state.usage, run.plots, logger, env, device)
    checkpointing = CheckpointHook(engine, state, run.root, cfg)
    metrics: dict[str, dict[str, float]] = {}
    # Caught from here on (USR2: checkpoint and requeue; SIGTERM: checkpoint and exit), not during set-up:
    # a set-up error then leaves no handler behind in a process that goes on (tests, notebooks).
    preemption = Preemption.install()
    try:
        for step in range(start_step + 1, last + 1):
            train_one_step(state, engine, logger, step, device)
            metrics = evaluation.after_step(step) or metrics
            stopping = step < last and preemption.agreed(device)  # collective: same answer on every rank
            checkpointing.after_step(step, stopping)
            if stopping:
                logger.message(preemption.describe(step))
                metrics = {}  # an earlier evaluation is not the result of the run
                break
    except BaseException:  # an error in the loop: no requeue, no handler and no worker left behind
        preemption.restore()
        state.loader.close()
        logger.close()  # ends the progress bar's line, so the error message starts on its own
        raise
    peak_memory = peak_memory_over_ranks(device)
    if is_main_process():
        write_text_atomically(run.root / RESOURCES_FILE, json.dumps(peak_memory) + "\n")
    logger.close()
    state.loader.close()
    preemption.finish()  # after USR2, rank 0 requeues the SLURM job; otherwise restores the handlers
    return metrics
