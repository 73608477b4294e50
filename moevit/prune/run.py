"""One pruning, end to end: usage -> criterion -> plan -> extracted model -> report (-> metrics) -> files."""

from __future__ import annotations

from pathlib import Path

from moevit.artifacts.model_dir import Manifest, build_from_manifest
from moevit.artifacts.usage import Usage
from moevit.models.multitask import MultiTaskModel
from moevit.prune.cost import PlanCost
from moevit.prune.criteria import Criterion, Plan, select_experts
from moevit.prune.extract import check_tasks, extract, make_manifest, write_pruned
from moevit.prune.report import pruning_report
from moevit.prune.source import Source, evaluate_on_cpu


def reference_model(source: Source, tasks: list[str]) -> MultiTaskModel:
    """The source architecture for `tasks` only, every expert kept (for costs; weights unused)."""
    plan = {
        name: list(range(layer.num_experts)) for name, layer in source.model.backbone.mlp_layers().items()
    }
    return build_from_manifest(make_manifest(source.cfg, source.model.backbone, tasks, plan))


def plan_cost(source: Source, tasks: list[str], criterion: Criterion):
    """The cost function a budget criterion needs (None for the others)."""
    if criterion.kind not in ("params", "gflops"):
        return None
    cost = PlanCost(reference_model(source, tasks), source.image_sizes())
    if criterion.kind == "params":
        return cost.params
    return lambda counts: max(cost.gflops(counts).values())


def make_plan(source: Source, tasks: list[str], usage: Usage, criterion: Criterion) -> Plan:
    cost = plan_cost(source, tasks, criterion)
    return select_experts(usage, tasks, source.top_k(), criterion, cost, source.routable())


def prune_to(source: Source, tasks: list[str], plan: Plan, **extra) -> tuple[MultiTaskModel, Manifest]:
    return extract(source.state, source.cfg, source.model.backbone, tasks, plan, **extra)


def run_prune(
    source: Source,
    task_names: list[str],
    criterion: Criterion,
    usage: Usage,
    usage_origin: str,
    out_dir: str | Path | None,
    with_metrics: bool = False,
) -> dict:
    """Prunes `source` for the tasks, writes the directory (if `out_dir`) and returns the report."""
    tasks = check_tasks(task_names, source.model.tasks)
    plan = make_plan(source, tasks, usage, criterion)
    model, manifest = prune_to(
        source,
        tasks,
        plan,
        criterion=str(criterion),
        usage_source=usage_origin,
        source_checkpoint=source.description,
    )
    metrics = None
    if with_metrics:
        metrics = {
            "before": evaluate_on_cpu(source.model, source.cfg, tasks),
            "after": evaluate_on_cpu(model, source.cfg, tasks),
        }
    report = pruning_report(source.model, model, tasks, source.image_sizes(), plan, metrics)
    report.update(criterion=str(criterion), usage_source=usage_origin, kept_experts=plan)
    if out_dir is not None:
        write_pruned(out_dir, model, manifest, source.cfg, report)
    return report
