"""Per-task, per-layer expert usage, counted once, by the training loop: the counts between evaluations,
saved as JSON and drawn as one task x expert heatmap per MoE layer (the kind of figure Mod-Squad uses
to show task specialisation), and a moving average of them, which pruning reads.

Counts are routed token slots (each of a token's k choices counts once), summed over all ranks when
written. Files, for the evaluation after step S:

    plots/usage_step{S:07d}.json             {"step", "since_step", "layers": {layer: {task: [count per expert]}},
                                              "ema_decay", "ema": {layer: {task: [average count per expert]}}}
    plots/usage_step{S:07d}_{layer}.png       rows: tasks, columns: experts, cells: % of the task's slots

The average (`train.usage_ema_decay`) is each rank's exponential moving average of its own counts,
updated at every step that trains the task; it is linear in the counts and every rank trains the same
tasks at the same steps, so the sum over ranks is the average of the all-rank counts. Each rank's
average is in its checkpoint client state (moevit.artifacts.usage reads and sums them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from moevit.artifacts.usage import tables_of_average
from moevit.parallel.collectives import all_reduce_sum
from moevit.train.task_expert_estimate import RunningTaskRows


class ExpertUsage:
    """Accumulates the expert counts of training steps, per layer, as (tasks, experts) int64 tables
    between evaluations, and keeps their moving average across evaluations.

    Args:
        tasks: every task, in config order (the table rows).
        ema_decay: weight of the old average at each step that trains a task.
    """

    def __init__(self, tasks: Sequence[str], ema_decay: float):
        self.tasks = list(tasks)
        self.counts: dict[str, torch.Tensor] = {}
        self.since_step = 0
        self.ema = RunningTaskRows(self.tasks, ema_decay)
        self.ema_layers: list[str] = []  # the layers of the average's rows, in forward order

    def add(self, expert_counts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Adds one step's counts: layer -> task -> (experts,) tokens routed."""
        for layer, by_task in expert_counts.items():
            for task, counts_E in by_task.items():
                table = self.counts.get(layer)
                if table is None:
                    table = self.counts[layer] = torch.zeros(
                        len(self.tasks), counts_E.numel(), dtype=torch.int64
                    )
                table[self.tasks.index(task)] += counts_E.to(torch.int64).cpu()
        if not expert_counts:
            return
        # This step's counts as (tasks, experts) tables, zero rows for the tasks it did not train.
        self.ema_layers = list(expert_counts)
        step_tables = []
        for layer in self.ema_layers:
            table = torch.zeros(self.counts[layer].shape)
            for task, counts_E in expert_counts[layer].items():
                table[self.tasks.index(task)] = counts_E.float().cpu()
            step_tables.append(table)
        self.ema.update(step_tables, trained=set(next(iter(expert_counts.values()))))

    def reduce_and_reset(self, step: int, device: torch.device) -> dict[str, Any]:
        """The all-rank counts since the last reset (a collective: every rank calls it), then starts over."""
        layers = list(self.counts)
        if layers:
            flat = torch.cat([self.counts[layer].flatten() for layer in layers]).to(device)
            flat = all_reduce_sum(flat).cpu()
            tables = flat.split([self.counts[layer].numel() for layer in layers])
        else:
            tables = []
        report = {
            "step": step,
            "since_step": self.since_step,
            "layers": {
                layer: dict(zip(self.tasks, table.view_as(self.counts[layer]).tolist()))
                for layer, table in zip(layers, tables)
            },
            "ema_decay": self.ema.decay,
            "ema": self.reduced_average(device),
        }
        self.counts = {}
        self.since_step = step
        return report

    def reduced_average(self, device: torch.device) -> dict[str, dict[str, list[float]]]:
        """The all-rank moving average {layer: {task: [slots per expert]}} (a collective: every rank
        calls it); tasks that never trained are left out."""
        if not self.ema.rows_LTE:
            return {}
        local = torch.cat([rows_TE.flatten() for rows_TE in self.ema.rows_LTE]).double().to(device)
        summed = all_reduce_sum(local).cpu().split([rows_TE.numel() for rows_TE in self.ema.rows_LTE])
        rows = [flat.view(rows_TE.shape).tolist() for flat, rows_TE in zip(summed, self.ema.rows_LTE)]
        saved_form = {"layers": self.ema_layers, "tasks": self.tasks, "seen": self.ema.seen_T.tolist()}
        return tables_of_average({**saved_form, "rows": rows})

    def state_dict(self) -> dict[str, Any]:
        return {
            "since_step": self.since_step,
            "counts": {k: v.tolist() for k, v in self.counts.items()},
            "ema": {"layers": self.ema_layers, **self.ema.state_dict()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.since_step = state["since_step"]
        self.counts = {
            layer: torch.tensor(rows, dtype=torch.int64) for layer, rows in state["counts"].items()
        }
        if "ema" in state:  # absent from checkpoints written before the average existed
            self.ema_layers = list(state["ema"]["layers"])
            self.ema.load_state_dict(state["ema"])


def write_usage_report(plots_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """Writes the report's JSON and one heatmap PNG per layer; returns the paths written."""
    stem = f"usage_step{report['step']:07d}"
    json_path = plots_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    written = [json_path]
    for layer, by_task in report["layers"].items():
        path = plots_dir / f"{stem}_{layer}.png"
        _draw_heatmap(path, layer, by_task, report["since_step"], report["step"])
        written.append(path)
    return written


def _draw_heatmap(
    path: Path, layer: str, by_task: Mapping[str, Sequence[int]], first_step: int, last_step: int
) -> None:
    tasks = list(by_task)
    counts_TE = torch.tensor([by_task[task] for task in tasks], dtype=torch.float64)
    percent_TE = 100 * counts_TE / counts_TE.sum(dim=1, keepdim=True).clamp(min=1)
    num_experts = counts_TE.shape[1]
    # A bare Figure draws with the Agg canvas: no pyplot, no global backend state, no display needed.
    figure = Figure(figsize=(1.0 + 0.5 * num_experts, 1.2 + 0.45 * len(tasks)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(percent_TE.numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    axes.set_yticks(range(len(tasks)), tasks)
    axes.set_xlabel("expert")
    axes.set_title(f"{layer}: % of each task's routed slots, steps {first_step + 1}-{last_step}", fontsize=9)
    for t in range(len(tasks)):
        for e in range(num_experts):
            value = percent_TE[t, e].item()
            axes.text(
                e, t, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w" if value < 50 else "k"
            )
    figure.colorbar(image, ax=axes, label="%")
    figure.savefig(path, dpi=100)
