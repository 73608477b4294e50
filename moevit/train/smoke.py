"""One forward and backward pass per task on real data: the end-to-end wiring check.

Builds the configured backbone with one router per task and a head per task, reads one batch
of each task's training split through the real readers and transforms, adds the auxiliary MoE
losses (load balance, z-loss, and the task-expert mutual information across the tasks), runs
backward, and reports per-task losses and expert usage. It is what `moevit demo` runs until the
training loop lands, and a quick check that a new config is wired correctly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from moevit.config import Config, save_config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.heads import build_head
from moevit.layers import load_balance_loss, mean_mutual_information_loss, router_z_loss, task_expert_matrices
from moevit.models.factory import build_backbone
from moevit.models.multitask import MultiTaskModel


def build_multitask_model(cfg: Config) -> MultiTaskModel:
    backbone = build_backbone(cfg)
    heads = {
        name: build_head(task.type, task.num_classes, backbone, task.data.image_size if task.data else 224)
        for name, task in cfg.tasks.items()
    }
    return MultiTaskModel(backbone, heads)


def _first_batch(task_type: str, cfg_task, batch_size: int) -> dict:
    dataset = build_dataset(task_type, cfg_task.data, train=True)
    return collate_for_task(task_type)([dataset[i % len(dataset)] for i in range(batch_size)])


def run_smoke(cfg: Config, batch_size: int = 4) -> dict:
    """Returns {"tasks": {task: {loss name: value}}, "mutual_information": ..., "usage": ...}."""
    missing = [name for name, task in cfg.tasks.items() if task.data is None]
    if missing:
        raise ValueError(f"tasks without a dataset: {missing}")
    torch.manual_seed(cfg.seed)
    model = build_multitask_model(cfg).train()
    batches = {name: _first_batch(task.type, task, batch_size) for name, task in cfg.tasks.items()}

    started = time.perf_counter()
    report: dict = {"tasks": {}}
    routing_by_task = {}
    total = torch.zeros(())
    for name, task in cfg.tasks.items():
        out = model(name, batches[name])
        routings = list(out.routing.values())
        balance, z_loss = load_balance_loss(routings), router_z_loss(routings)
        total = total + task.loss_weight * out.losses["loss"]
        total = total + cfg.aux_loss.load_balance * balance + cfg.aux_loss.z_loss * z_loss
        routing_by_task[name] = out.routing
        parts = {key: value.item() for key, value in out.losses.items()}
        report["tasks"][name] = {**parts, "load_balance": balance.item(), "z_loss": z_loss.item()}
    # The MI loss couples the tasks (it needs every task's row), so it joins after all forwards.
    # Equal task prior: one batch of every task is what this step saw.
    matrices = task_expert_matrices({t: list(r.values()) for t, r in routing_by_task.items()}, model.tasks)
    mutual_information = mean_mutual_information_loss(matrices)
    (total + cfg.aux_loss.mutual_information * mutual_information).backward()

    parameters = [p for p in model.parameters() if p.requires_grad]
    report["mutual_information_loss"] = mutual_information.item()
    report["parameters_with_gradient"] = sum(p.grad is not None for p in parameters)
    report["parameters"] = len(parameters)
    report["seconds"] = time.perf_counter() - started
    layers = routing_by_task[model.tasks[0]]
    report["usage"] = {
        layer: {task: routing_by_task[task][layer].counts_E.tolist() for task in model.tasks}
        for layer in layers
    }
    return report


def format_smoke_report(report: dict) -> str:
    lines = ["per-task losses (one batch each, forward + backward):"]
    for task, losses in report["tasks"].items():
        lines.append(f"  {task:<10} " + "  ".join(f"{key}={value:.4f}" for key, value in losses.items()))
    lines.append(f"  mutual-information loss across tasks: {report['mutual_information_loss']:.4f}")
    lines.append(
        f"  backward reached {report['parameters_with_gradient']}/{report['parameters']} parameter tensors "
        f"in {report['seconds']:.1f} s"
    )
    lines.append("expert usage (% of routed token slots per task):")
    for layer, by_task in report["usage"].items():
        lines.append(f"  {layer}")
        for task, counts in by_task.items():
            slots = max(sum(counts), 1)
            lines.append(f"    {task:<10} " + " ".join(f"{100 * c / slots:5.1f}" for c in counts))
    return "\n".join(lines)


def write_smoke_run(cfg: Config, report: dict) -> Path:
    """The run dir: resolved config and the report as JSON."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "smoke.json").write_text(json.dumps(report, indent=2))
    return run_dir
