"""`moevit prune --sweep`: many criteria on one source, each pruned model evaluated: a Pareto table.

Writes `sweep.csv` (one row per distinct plan: criterion, kept experts, parameters, GFLOPs, the tasks'
main metrics) and `sweep.png` (metric against parameters per task, the Pareto front drawn as a step
line). Criteria giving the same plan are evaluated once and listed together.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from moevit.artifacts.usage import Usage
from moevit.prune.criteria import Criterion
from moevit.prune.extract import check_tasks
from moevit.prune.report import model_figures
from moevit.prune.run import make_plan, prune_to
from moevit.prune.source import Source, evaluate_on_cpu

MAIN_METRIC = {"classification": "top1", "detection": "bbox_mAP", "segmentation": "mIoU"}


def default_grid(max_experts: int) -> list[Criterion]:
    return (
        [Criterion("all")]
        + [Criterion("top", m) for m in range(1, max_experts)]
        + [Criterion("mass", p) for p in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
        + [Criterion("threshold", t) for t in (0, 1, 3, 6, 10)]
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal cost and higher or equal metric, one strictly)."""
    front = []
    for i, (cost, metric) in enumerate(points):
        dominated = any(
            c <= cost and m >= metric and (c < cost or m > metric)
            for j, (c, m) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def run_sweep(
    source: Source,
    task_names: list[str],
    usage: Usage,
    out_dir: str | Path,
    grid: Sequence[Criterion] | None = None,
) -> list[dict]:
    tasks = check_tasks(task_names, source.model.tasks)
    layers = source.model.backbone.mlp_layers()
    grid = (
        list(grid) if grid is not None else default_grid(max(layer.num_experts for layer in layers.values()))
    )
    rows: dict[tuple, dict] = {}
    for criterion in grid:
        plan = make_plan(source, tasks, usage, criterion)
        key = tuple(tuple(ids) for ids in plan.values())
        if key in rows:
            rows[key]["criterion"] += f"; {criterion}"
            continue
        model, _ = prune_to(source, tasks, plan)
        figures = model_figures(model, tasks, source.image_sizes(), plan)
        metrics = evaluate_on_cpu(model, source.cfg, tasks)
        row = {
            "criterion": str(criterion),
            "kept_experts": figures["experts"],
            "experts_per_layer": " ".join(str(len(ids)) for ids in plan.values()),
            "params": figures["params_for_tasks"],
        }
        for task in tasks:
            metric = MAIN_METRIC[source.cfg.tasks[task].type]
            row[f"{task}_gflops"] = round(figures["gflops"][task], 6)
            row[f"{task}_{metric}"] = round(metrics[task][metric], 6)
        rows[key] = row
    table = sorted(rows.values(), key=lambda r: r["params"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _plot(out / "sweep.png", table, tasks, {t: MAIN_METRIC[source.cfg.tasks[t].type] for t in tasks})
    return table


def _plot(path: Path, table: list[dict], tasks: list[str], metrics: dict[str, str]) -> None:
    figure = Figure(figsize=(5.5 * len(tasks), 4.2), layout="constrained")
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        column = f"{task}_{metrics[task]}"
        points = [(row["params"] / 1e6, row[column]) for row in table]
        axes.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        front = pareto_front(points)
        axes.step(
            [points[j][0] for j in front],
            [points[j][1] for j in front],
            where="post",
            color="tab:orange",
            label="Pareto front",
        )
        # Only the front is labelled (alternately above and below): labels of all points overlap where
        # several criteria land close together; sweep.csv names every point.
        for n, j in enumerate(front):
            axes.annotate(
                table[j]["criterion"].split(";")[0],
                points[j],
                fontsize=6,
                xytext=(3, 4 if n % 2 == 0 else -9),
                textcoords="offset points",
            )
        axes.set_xlabel("parameters (M)")
        axes.set_ylabel(metrics[task])
        axes.set_title(f"{task}: pruned models", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
