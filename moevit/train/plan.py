"""`moevit plan`: what a config costs per task on N GPUs, before the job is submitted.

Per task: parameters (moevit.models.flops.count_parameters), the backbone's active forward GFLOPs
per image (moevit.models.flops.analytic_flops, the count of `moevit flops`, plus the head's
convolutions from moevit.train.head_cost), tokens per step, the
activation memory per GPU (moevit.train.activation_memory) and the epochs of its dataset the schedule
covers (moevit.data.coverage, the numbers the training start logs). The model is built with its
parameters on the meta device: a ViT-B plan allocates no weights and takes about a second.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

import torch

from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.data.coverage import epochs_covered
from moevit.data.schedule import build_schedule
from moevit.factory import build_model
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.flops import analytic_flops, count_parameters, task_table
from moevit.models.multitask import MultiTaskModel
from moevit.parallel.layout import check_layout
from moevit.train.activation_memory import COMPUTE_BYTES, task_activation_bytes, windows_of
from moevit.train.head_cost import head_cost

GIB = 2**30
# Training compute per image: forward + backward (about twice the forward: gradients of activations and
# of weights), the usual 3x of Kaplan et al. 2020.
TRAIN_FLOPS_PER_FORWARD = 3


def build_meta_model(cfg: Config, source: str = "config") -> MultiTaskModel:
    """The config's model (backbone and heads) with meta parameters; a model that cannot be built is a
    ConfigError naming `source`."""
    try:
        with torch.device("meta"):  # nothing allocated or drawn: a ViT-B plan takes a fraction of a second
            return build_model(cfg)
    except (ValueError, TypeError) as err:  # TypeError: an unknown head option
        raise ConfigError(source, f"the model of 'model' and 'tasks' cannot be built: {err}") from None


def resolved_precision(cfg: Config) -> str:
    """parallel.precision for a GPU job: "auto" is bf16 there (moevit.parallel.setup.resolve_precision)."""
    return "bf16" if cfg.parallel.precision == "auto" else cfg.parallel.precision


def plan_report(cfg: Config, gpus: int, source: str = "config") -> dict:
    """Per-task sizes of `cfg` trained on `gpus` data-parallel ranks (see the module doc and
    docs/training.md, "Sizing a job")."""
    if gpus < 1:
        raise ConfigError(source, f"--gpus must be >= 1, got {gpus}")
    train_cfg = cfg.training_view()
    missing = [name for name, task in train_cfg.tasks.items() if task.data is None]
    if missing:
        raise ConfigError(source, f"a plan needs a dataset for every training task; missing {missing}")
    model = build_meta_model(cfg, source)
    expert_counts = {m.num_experts for m in model.modules() if isinstance(m, MoEMlp)}
    layout_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend="gloo"))
    for num_experts in sorted(expert_counts) or [None]:  # the backend is the job's business, not the plan's
        check_layout(layout_cfg, gpus, num_experts)
    precision = resolved_precision(cfg)
    params = count_parameters(model.backbone)
    coverage = epochs_covered(train_cfg, gpus)
    sizes = {name: c.dataset_size.images for name, c in coverage.items()}
    step_probability = build_schedule(train_cfg, sizes).step_probabilities
    windows = windows_of(cfg.model.window_size, cfg.model.global_blocks)
    tasks = {}
    for name, task in train_cfg.tasks.items():
        side = task.image_size
        flops = analytic_flops(model.backbone, side, name)
        memory = task_activation_bytes(
            model.backbone,
            model.heads[name],
            (side, side),
            task.data.batch_size,
            precision,
            windows,
            checkpointing=cfg.train.activation_checkpointing,
        )
        head = head_cost(model.heads[name], model.backbone, (side, side), COMPUTE_BYTES[precision])
        head_gflops = 2 * head.macs / 1e9
        gflops = flops["gflops"] + head_gflops
        batch = task.data.batch_size
        covered = coverage[name]
        tasks[name] = {
            "image_size": [side, side],
            "tokens_per_image": flops["tokens"],
            "batch_per_gpu": batch,
            "params_task": params["per_task"][name],
            "params_active_per_token": params["active_per_token"][name],
            "gflops_per_image": gflops,
            "gflops_backbone": flops["gflops"],
            "gflops_head": head_gflops,
            # A step reads grad_accum_steps micro-batches of `batch` per GPU (activation memory: one).
            "tokens_per_step_per_gpu": batch * cfg.train.grad_accum_steps * flops["tokens"],
            "tokens_per_step_global": batch * cfg.train.grad_accum_steps * flops["tokens"] * gpus,
            "step_probability": step_probability[name],
            "activation_gib_per_gpu": memory["total"] / GIB,
            "activation_gib_backbone": memory["backbone"] / GIB,
            "activation_gib_head": memory["head"] / GIB,
            "steps_trained": covered.steps,
            "samples": covered.samples,
            "dataset_size": covered.dataset_size.images,
            "dataset_size_nominal": covered.dataset_size.nominal,
            "epochs": covered.epochs,
            "train_pflops": TRAIN_FLOPS_PER_FORWARD * gflops * covered.samples / 1e6,
        }
    all_tasks = cfg.train.sampling.strategy == "all"
    memories = [row["activation_gib_per_gpu"] for row in tasks.values()]
    return {
        "gpus": gpus,
        "precision": precision,
        "strategy": cfg.train.sampling.strategy,
        "steps": cfg.train.steps,
        "tasks": tasks,
        "totals": {
            "params_total": params["total"],
            # "all" keeps every task's graph for one backward (moevit.train.step); otherwise one task a step.
            "activation_gib_per_gpu_per_step": sum(memories) if all_tasks else max(memories),
            "tokens_per_step_global": sum(
                row["tokens_per_step_global"] * row["step_probability"] for row in tasks.values()
            ),
            "train_pflops": sum(row["train_pflops"] for row in tasks.values()),
        },
        "notes": NOTES,
    }


NOTES = (
    "GFLOPs: forward, per image, 2 x multiply-adds of contractions: the backbone as `moevit flops` counts "
    "it (top_k experts per token, attention matmuls included) plus the head's convolutions and linears "
    "(moevit.train.head_cost; the JSON splits the two). Tokens/step: one step "
    "that trains the task; the total weights each task by the share of steps that train it. Activation "
    "memory: analytic estimate of what one training forward keeps for the backward at the batch per GPU "
    "(one accumulation round) and precision (bf16 for 'auto': a plan assumes GPUs), backbone + head, without parameters, "
    "gradients and optimizer state (moevit.train.activation_memory). The per-step total sums the tasks "
    "under strategy 'all' (one backward over all of them), else takes the largest. Epochs: batch x grad_accum_steps x "
    "GPUs x steps that train the task / train-split size; * marks the real dataset's published size, used when "
    "the data root is missing. Train PFLOPs: 3 x forward GFLOPs x samples."
)

_COLUMNS = (  # (header, cell of a task row)
    ("image", lambda row: "{}x{}".format(*row["image_size"])),
    ("batch/GPU", lambda row: str(row["batch_per_gpu"])),
    ("active params", lambda row: f"{row['params_active_per_token'] / 1e6:.1f}M"),
    ("GFLOPs/img", lambda row: f"{row['gflops_per_image']:.1f}"),
    ("tokens/step GPU", lambda row: f"{row['tokens_per_step_per_gpu']:,}"),
    ("tokens/step all", lambda row: f"{row['tokens_per_step_global']:,}"),
    ("act. mem/GPU", lambda row: f"{row['activation_gib_per_gpu']:.2f} GiB"),
    ("steps", lambda row: f"{row['steps_trained']:,}"),
    ("epochs", lambda row: f"{row['epochs']:.2f}" + ("*" if row["dataset_size_nominal"] else "")),
    ("train PFLOPs", lambda row: _amount(row["train_pflops"])),
)


def _amount(value: float) -> str:
    """Whole numbers with separators when large, three significant digits when small (demo configs)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_plan_table(report: dict) -> str:
    """An aligned text table of a `plan_report`: one row per task, the totals and the notes under it."""
    lines = task_table(_COLUMNS, report["tasks"])
    totals = report["totals"]
    summary = (
        f"{report['gpus']} GPUs, {report['precision']}, strategy {report['strategy']}, "
        f"{report['steps']:,} steps: {totals['params_total'] / 1e6:.1f}M parameters, "
        f"activations {totals['activation_gib_per_gpu_per_step']:.2f} GiB/GPU per step, "
        f"{totals['tokens_per_step_global']:,.0f} tokens/step (mean over steps), "
        f"{_amount(totals['train_pflops'])} train PFLOPs"
    )
    width = max(len(lines[0]), 60)
    return "\n".join([*lines, "", textwrap.fill(summary, width), "", textwrap.fill(report["notes"], width)])


def run_plan(cfg: Config, gpus: int, as_json: bool, source: str = "config") -> str:
    """What `moevit plan CONFIG [--gpus N] [--json]` prints."""
    report = plan_report(cfg, gpus, source)
    return json.dumps(report, indent=2) if as_json else format_plan_table(report)
