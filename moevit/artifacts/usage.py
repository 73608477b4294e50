"""Expert usage a training run saved, read back for pruning and continual learning.

Usage is plain data, `{layer: {task: [routed slots per expert]}}` over the MoE MLP layers
("blocks.<i>.mlp"); a calibration pass (moevit.prune.usage) produces the same shape. What a run keeps
(moevit.train.usage_plots):

- a moving average of each task's routed slots, as Mod-Squad keeps for pruning: every rank's share in
  its checkpoint client state (summed here: the average is linear in the counts);
- the counts of each window between evaluations, `<run>/plots/usage_step<S>.json`, and the checkpoint's
  counts not yet reported. Runs written before the average existed (2026-12-06) have only these; the
  last window then stands for the model as it ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moevit.artifacts.checkpoints import CheckpointRef
from moevit.artifacts.run_dir import RunDir
from moevit.models.param_names import is_mlp_layer
from moevit.parallel.checkpoint import is_complete_checkpoint, read_client_state, read_client_states

Usage = dict[str, dict[str, list[float]]]  # layer -> task -> routed slots per expert
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


def usage_from_run(run_root: Path, tag: str) -> tuple[Usage, str]:
    """(usage, where it came from) for checkpoint `tag` of a run dir: the moving average when the
    checkpoint holds one, else the last window's counts; empty when the run kept neither."""
    average = average_from_checkpoint(run_root, tag)
    if average is not None:
        usage, decay = average
        return mlp_layers_only(usage), f"moving average of the training counts (decay {decay}) at {tag}"
    return last_window_from_run(run_root, tag)


def average_from_checkpoint(run_root: Path, tag: str) -> tuple[Usage, float] | None:
    """The all-rank moving average of checkpoint `tag` and its decay; None when it holds none."""
    if not is_complete_checkpoint(CheckpointRef(run_root, tag).directory):
        return None
    usage: Usage = {}
    decay = None
    for state in read_client_states(run_root, tag):
        average = state.get("usage", {}).get("ema")
        if not average or not average["rows"]:
            return None
        decay = average["decay"]
        usage = add_usage(usage, tables_of_average(average))
    return usage, decay


def tables_of_average(average: Mapping[str, Any]) -> Usage:
    """{layer: {task: row}} of a moving average as ExpertUsage saves it ("layers", "tasks", "seen",
    "rows"); tasks that never trained are left out."""
    seen = [task for task, seen in zip(average["tasks"], average["seen"]) if seen]
    return {
        layer: {task: rows[average["tasks"].index(task)] for task in seen}
        for layer, rows in zip(average["layers"], average["rows"])
    }


def last_window_from_run(run_root: Path, tag: str) -> tuple[Usage, str]:
    """(counts, where they came from) of the last evaluation window at or before checkpoint `tag`, plus
    the checkpoint's counts not yet reported; empty when none were kept."""
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
