"""Before/after figures of a pruning: experts, parameters, active parameters, GFLOPs (and metrics).

"before" is the source model as one task uses it: the shared backbone with every expert, that task's
gates and embedding, and its head (`count_parameters(...)["per_task"]` + head); the whole multi-task
model's total is reported too. "after" is the pruned model (backbone and the kept tasks' heads).
GFLOPs are the analytic backbone count per image at the task's image size (moevit.models.flops; heads
have no analytic count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moevit.models.flops import analytic_flops, count_parameters
from moevit.models.multitask import MultiTaskModel


def model_figures(
    model: MultiTaskModel,
    tasks: Sequence[str],
    image_sizes: Mapping[str, int],
    plan: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """Experts, parameters and GFLOPs of `model` for `tasks`; give the `plan` of a pruned model (a layer
    left with one expert is a plain MLP, no longer an MoE layer, but still counts one expert)."""
    backbone = model.backbone
    params = count_parameters(backbone)
    if plan is None:
        experts = {name: layer.num_experts for name, layer in backbone.mlp_layers().items()}
    else:
        experts = {name: len(ids) for name, ids in plan.items()}
    head_params = {task: sum(p.numel() for p in model.heads[task].parameters()) for task in tasks}
    return {
        "experts_per_layer": experts,
        "experts": sum(experts.values()),
        "params_model": sum(p.numel() for p in model.parameters()),
        "params_for_tasks": params["per_task"][tasks[0]]
        - sum(p.numel() for p in _gates_and_embedding(backbone, tasks[0]))
        + sum(sum(p.numel() for p in _gates_and_embedding(backbone, t)) for t in tasks)
        + sum(head_params.values()),
        "params_active_per_token": {t: params["active_per_token"][t] + head_params[t] for t in tasks},
        "gflops": {t: analytic_flops(backbone, image_sizes[t], t)["gflops"] for t in tasks},
    }


def _gates_and_embedding(backbone, task: str):
    for _, router in backbone.routers():
        yield from router.gates[task].parameters()
    if backbone.task_embed is not None:
        yield backbone.task_embed[task]


def pruning_report(
    source: MultiTaskModel,
    pruned: MultiTaskModel,
    tasks: Sequence[str],
    image_sizes: Mapping[str, int],
    plan: Mapping[str, Sequence[int]],
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> dict:
    """{"before", "after", "reduction"} (+ "metrics": {"before", "after"} when given)."""
    before = model_figures(source, tasks, image_sizes)
    after = model_figures(pruned, tasks, image_sizes, plan)
    report = {
        "tasks": list(tasks),
        "before": before,
        "after": after,
        "reduction": {
            "params": 1 - after["params_for_tasks"] / before["params_for_tasks"],
            "gflops": {t: 1 - after["gflops"][t] / before["gflops"][t] for t in tasks},
        },
    }
    if metrics:
        report["metrics"] = dict(metrics)
    return report


def format_report(report: dict) -> str:
    """A short text table: one row per task, before -> after."""
    before, after = report["before"], report["after"]
    lines = [
        f"experts kept: {after['experts']} of {before['experts']}  "
        + " ".join(f"{k}:{v}" for k, v in after["experts_per_layer"].items()),
        f"parameters (backbone for these tasks + heads): {before['params_for_tasks'] / 1e6:.3f}M -> "
        f"{after['params_for_tasks'] / 1e6:.3f}M ({100 * report['reduction']['params']:.1f}% fewer; "
        f"whole source model {before['params_model'] / 1e6:.3f}M)",
    ]
    for task in report["tasks"]:
        row = (
            f"{task}: GFLOPs {before['gflops'][task]:.4f} -> {after['gflops'][task]:.4f}, active params/token "
            f"{before['params_active_per_token'][task] / 1e6:.3f}M -> {after['params_active_per_token'][task] / 1e6:.3f}M"
        )
        if "metrics" in report:
            full, pruned = report["metrics"]["before"][task], report["metrics"]["after"][task]
            row += "; " + ", ".join(f"{m} {full[m]:.4f} -> {pruned[m]:.4f}" for m in full)
        lines.append(row)
    return "\n".join(lines)
