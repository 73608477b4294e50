"""Running per-task rows of a task x expert table: the MI loss's estimate of A[t, e], so the loss works
when a step trains only some tasks, and the training loop's moving average of expert usage.

Mod-Squad's mutual-information loss needs every task's row of A[t, e] (router probability mass that
task t's tokens gave expert e) in the same matrix: I(T; E) of a matrix with one non-empty row is 0, and
so is its gradient. Per-dataset sampling (`train.sampling.strategy: weighted` or `round_robin`) trains
one task per step, so each step would see one row and the routers would get no specialisation pressure.

`RunningTaskRows` keeps, per MoE layer, an exponential moving average of each task's row, updated only
when that task trains. For the MI loss the rows are all-rank sums of router probability mass. A step's MI loss takes the current, differentiable rows of the tasks
it trained and the running rows, detached, of the others: the trained tasks' routers then get the
gradient of the full I(T; E). When a step trains every task (`strategy: all`) no running row is used
and the loss is exactly the single-step one.

The decay counts updates of a task's row, not steps, so a rarely sampled task keeps the same window in
samples as a frequent one. The MI rows are all-rank sums (identical on every rank), so that estimate
needs no collective of its own and every rank's copy stays equal. The average is linear in the rows,
so per-rank averages of per-rank counts (moevit.train.usage_plots) sum to the average of the all-rank
counts. Either is saved in the checkpoint's client state, which keeps resume exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch


class RunningTaskRows:
    """Per MoE layer, an EMA of each task's row of a (tasks, experts) table.

    Args:
        tasks: the rows, in the order of the step's matrices.
        decay: weight of the old row when a task's row is updated (0: the last update only).
    """

    def __init__(self, tasks: Sequence[str], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.tasks = list(tasks)
        self.decay = decay
        self.rows_LTE: list[torch.Tensor] = []  # per layer (tasks, experts of that layer); empty until a step
        self.seen_T = torch.zeros(len(self.tasks), dtype=torch.bool)  # tasks with a running row

    def _mask(self, trained: Collection[str]) -> torch.Tensor:
        return torch.tensor([task in trained for task in self.tasks], dtype=torch.bool)

    def complete(self, current_LTE: Sequence[torch.Tensor], trained: Collection[str]) -> list[torch.Tensor]:
        """The step's matrices with the rows of tasks that did not train replaced by their running rows
        (detached; tasks never trained keep their zero rows, which the MI loss leaves out)."""
        stale_T = ~self._mask(trained) & self.seen_T
        if not self.rows_LTE or not stale_T.any():
            return list(current_LTE)
        completed = []
        for current_TE, running_TE in zip(current_LTE, self.rows_LTE, strict=True):
            stale = stale_T.to(current_TE.device)[:, None]
            completed.append(torch.where(stale, running_TE.to(current_TE), current_TE))
        return completed

    @torch.no_grad()
    def update(self, current_LTE: Sequence[torch.Tensor], trained: Collection[str]) -> None:
        """Folds the trained tasks' current rows (all-rank sums) into the running rows."""
        trained_T = self._mask(trained)
        if not self.rows_LTE:
            self.rows_LTE = [torch.zeros_like(m, dtype=torch.float32) for m in current_LTE]
        elif self.rows_LTE[0].device != current_LTE[0].device:  # restored on the CPU; the step's device
            self.rows_LTE = [rows_TE.to(current_LTE[0].device) for rows_TE in self.rows_LTE]
        first_T = trained_T & ~self.seen_T  # a task's first row is taken as it is (no bias towards 0)
        for running_TE, current_TE in zip(self.rows_LTE, current_LTE, strict=True):
            current_TE = current_TE.detach().to(running_TE)
            blended_TE = self.decay * running_TE + (1 - self.decay) * current_TE
            new_TE = torch.where(first_T.to(running_TE.device)[:, None], current_TE, blended_TE)
            running_TE.copy_(torch.where(trained_T.to(running_TE.device)[:, None], new_TE, running_TE))
        self.seen_T |= trained_T

    def state_dict(self) -> dict[str, Any]:
        """JSON-able (checkpoint client state); float32 values survive the round trip exactly."""
        return {
            "tasks": self.tasks,
            "decay": self.decay,
            "seen": self.seen_T.tolist(),
            "rows": [rows_TE.cpu().tolist() for rows_TE in self.rows_LTE],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(
                f"the saved estimate covers tasks {state['tasks']}, this run trains {self.tasks}"
            )
        self.seen_T = torch.tensor(state["seen"], dtype=torch.bool)
        self.rows_LTE = [torch.tensor(rows, dtype=torch.float32) for rows in state["rows"]]
