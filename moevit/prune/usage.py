"""Per-task, per-layer, per-expert usage: routed token slots, from training counters or a calibration pass.

Usage is plain data, `{layer: {task: [slots per expert]}}` for the MoE MLP layers ("blocks.<i>.mlp"),
so both sources look the same to the criteria:

- counters (`usage_from_run`): the training loop's all-rank ExpertUsage. The loop resets it at every
  evaluation after writing `<run>/plots/usage_step<S>.json`, so what a checkpoint at step S holds is
  the newest report at or before S (the last window of training) plus the checkpoint's client-state
  counts not yet reported. The per-gate `usage` buffers are not read: under expert parallelism only
  rank 0's are saved.
- calibration (`calibrate_usage`): N batches of a task's data through the model in eval mode, one
  process, no DeepSpeed. Images use the deterministic eval transforms; batches are drawn from a seeded
  shuffle of the split, so N small still covers the classes (folder datasets are sorted by class).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from moevit.artifacts.checkpoints import CheckpointRef
from moevit.artifacts.run_dir import RunDir
from moevit.config.schema import Config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.models.moe_vit import MoEViT
from moevit.models.param_names import is_mlp_layer
from moevit.parallel.checkpoint import is_complete_checkpoint, read_client_state

Usage = dict[str, dict[str, list[int]]]  # layer -> task -> routed slots per expert
_REPORT = re.compile(r"^usage_step(\d+)\.json$")


def add_usage(total: Usage, more: Usage) -> Usage:
    """Element-wise sum of two usage tables (a new table)."""
    out = {layer: {task: list(c) for task, c in by_task.items()} for layer, by_task in total.items()}
    for layer, by_task in more.items():
        for task, counts in by_task.items():
            mine = out.setdefault(layer, {}).setdefault(task, [0] * len(counts))
            if len(mine) != len(counts):
                raise ValueError(f"usage of {layer}/{task}: {len(mine)} experts against {len(counts)}")
            out[layer][task] = [a + b for a, b in zip(mine, counts)]
    return out


def mlp_layers_only(usage: Usage) -> Usage:
    """The MoE MLP layers (attention-head experts are not pruned)."""
    return {layer: by_task for layer, by_task in usage.items() if is_mlp_layer(layer)}


def has_counts(usage: Usage, tasks: Sequence[str]) -> bool:
    """Whether every task routed at least one slot in every layer."""
    return bool(usage) and all(sum(by_task.get(task, [])) > 0 for by_task in usage.values() for task in tasks)


# ------------------------------------------------------------------------------------------ counters
def usage_from_run(run_root: Path, tag: str) -> tuple[Usage, str]:
    """(counters, where they came from) for checkpoint `tag` of a run dir; empty when none were kept."""
    step = int(tag.split("_")[-1])
    reports = []
    for path in RunDir(run_root).plots.glob("usage_step*.json"):
        match = _REPORT.match(path.name)
        if match and int(match[1]) <= step:
            reports.append((int(match[1]), path))
    usage: Usage = {}
    sources = []
    if reports:
        report_step, path = max(reports)
        report = json.loads(path.read_text())
        usage = add_usage(usage, report["layers"])
        sources.append(f"{path.name} (steps {report['since_step'] + 1}-{report_step})")
    if is_complete_checkpoint(CheckpointRef(run_root, tag).directory):
        pending = read_client_state(run_root, tag).get("usage", {})
        counts = pending.get("counts", {})
        if counts:
            tasks = _tasks_of_report(reports)
            usage = add_usage(usage, {layer: dict(zip(tasks, rows)) for layer, rows in counts.items()})
            sources.append(f"client state of {tag} (steps {pending['since_step'] + 1}-{step})")
    return mlp_layers_only(usage), " + ".join(sources) or "none"


def _tasks_of_report(reports: list) -> list[str]:
    """Task order of the client-state tables: the reports' (config order); needs one report."""
    if not reports:
        raise ValueError("client-state usage counts without any usage report cannot be matched to tasks")
    report = json.loads(max(reports)[1].read_text())
    return list(next(iter(report["layers"].values())))


# --------------------------------------------------------------------------------------- calibration
def count_routing(backbone: MoEViT, batches: Iterable[tuple[str, torch.Tensor]]) -> Usage:
    """Routed slots per expert of every MoE MLP layer over (task, images) batches; eval mode, no grad."""
    was_training = backbone.training
    backbone.eval()
    usage: Usage = {}
    try:
        with torch.no_grad():
            for task, images in batches:
                routing = backbone.forward_backbone(images, task).routing
                step = {
                    layer: {task: r.counts_E.tolist()} for layer, r in routing.items() if is_mlp_layer(layer)
                }
                usage = add_usage(usage, step)
    finally:
        backbone.train(was_training)
    return usage


def calibration_batches(
    cfg: Config, task: str, num_batches: int, split: str = "train", seed: int = 0
) -> Iterable[tuple[str, torch.Tensor]]:
    """`num_batches` batches of `task`'s `split` ("train" or "val") with eval transforms, seeded shuffle."""
    task_cfg = cfg.tasks[task]
    if task_cfg.data is None:
        raise ValueError(f"task {task!r} has no dataset (tasks.{task}.data) to calibrate on")
    if split not in ("train", "val"):
        raise ValueError(f"calibration split must be 'train' or 'val', got {split!r}")
    split_name = task_cfg.data.train_split if split == "train" else task_cfg.data.val_split
    # train=False: the deterministic eval transforms, read from whichever split was asked for.
    dataset = build_dataset(
        task_cfg.type, dataclasses.replace(task_cfg.data, val_split=split_name), train=False
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=task_cfg.data.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        collate_fn=collate_for_task(task_cfg.type),
        num_workers=0,
    )
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        yield task, batch["images"]


def calibrate_usage(
    backbone: MoEViT, cfg: Config, tasks: Sequence[str], num_batches: int, split: str = "train"
) -> Usage:
    """Usage of each task over `num_batches` of its own data (see `calibration_batches`)."""
    if num_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {num_batches}")
    usage: Usage = {}
    for task in tasks:
        usage = add_usage(usage, count_routing(backbone, calibration_batches(cfg, task, num_batches, split)))
    return usage
