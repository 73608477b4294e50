"""Task-loss balancing: the weight each task's loss gets in a step's total.

Three methods, all multiplying each task's static ``loss_weight`` (``w_t``):

- static: ``w_t`` alone.
- uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): a learned log-variance ``s_t`` per
  task; the objective is ``sum_t exp(-s_t) w_t L_t + s_t`` (Kendall's ``L / sigma^2 + log sigma^2``,
  twice the paper's regression form, which has the same minimiser), so the task weight is
  ``w_t exp(-s_t)`` and, for a fixed loss, ``s_t`` settles at ``log(w_t L_t)``.
- dynamic weight average, DWA (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
  Attention", CVPR 2019, eq. 1): ``lambda_t = K exp(r_t / T) / sum_i exp(r_i / T)`` with
  ``r_t = L_t(p-1) / L_t(p-2)``, the ratio of the task's mean loss over the last two periods; the
  paper's period is an epoch, here it is ``window`` steps. Until two periods are measured,
  ``lambda_t = 1``.

A step's task losses are scaled by the *current* weights (``weights()``), then the balancer sees the
step's detached losses (``update``), averaged over all ranks, so every rank holds the same weights and
no balancer parameter enters the model's backward. For uncertainty weighting this gives exactly the
joint gradient of Kendall's objective: d/ds_t of ``exp(-s_t) w_t L_t + s_t`` needs only the loss
value, and its mean over ranks is the gradient at the mean loss (it is linear in ``L_t``).

State (``state_dict``) is plain JSON-able data so it rides in a checkpoint's client state; float32
values survive the round trip through Python floats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from moevit.config.schema import LossBalancingConfig


class LossBalancer(Protocol):
    """What the training step relies on."""

    method: str

    def weights(self) -> dict[str, float]:
        """The multiplier of each task's loss in the next step's total."""
        ...

    def update(self, step_losses: Mapping[str, float]) -> None:
        """Learn from the step's per-task losses (rank mean) of the tasks that trained in it."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _check_losses(step_losses: Mapping[str, float], tasks: Mapping[str, float]) -> None:
    unknown = sorted(set(step_losses) - set(tasks))
    if unknown:
        raise KeyError(f"loss balancer: losses of unknown tasks {unknown}; tasks are {sorted(tasks)}")
    bad = {task: value for task, value in step_losses.items() if not math.isfinite(value)}
    if bad:
        raise ValueError(f"loss balancer: non-finite task losses {bad}")


def _check_state(state: Mapping[str, Any], method: str, tasks: Mapping[str, float]) -> None:
    if state.get("method") != method:
        raise ValueError(
            f"loss balancer state is for method {state.get('method')!r}, but train.loss_balancing.method "
            f"is {method!r}"
        )
    saved = sorted(state.get("tasks", []))
    if saved != sorted(tasks):
        raise ValueError(f"loss balancer state names tasks {saved}, the config has {sorted(tasks)}")


class StaticWeights:
    """Each task's configured ``loss_weight``, unchanged during training.

    Args:
        static_weights: task name -> loss_weight.
    """

    method = "static"

    def __init__(self, static_weights: Mapping[str, float]):
        self.static_weights = dict(static_weights)

    def weights(self) -> dict[str, float]:
        return dict(self.static_weights)

    def update(self, step_losses: Mapping[str, float]) -> None:
        _check_losses(step_losses, self.static_weights)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "tasks": list(self.static_weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.method, self.static_weights)


class UncertaintyWeighting:
    """Kendall et al.'s homoscedastic-uncertainty weights, ``w_t exp(-s_t)``, with ``s_t`` learned by Adam.

    Args:
        static_weights: task name -> loss_weight (scales the loss the log-variance sees).
        lr: Adam learning rate of the log-variances.
    """

    method = "uncertainty"

    def __init__(self, static_weights: Mapping[str, float], lr: float):
        self.static_weights = dict(static_weights)
        # One tensor per task: Adam skips a tensor whose .grad is None, so a task that did not train
        # this step keeps its log-variance and its moments instead of drifting on momentum.
        self.log_variances = {task: torch.zeros((), requires_grad=True) for task in self.static_weights}
        self.optimizer = torch.optim.Adam(list(self.log_variances.values()), lr=lr)

    def weights(self) -> dict[str, float]:
        return {
            task: weight * math.exp(-self.log_variances[task].item())
            for task, weight in self.static_weights.items()
        }

    def update(self, step_losses: Mapping[str, float]) -> None:
        _check_losses(step_losses, self.static_weights)
        if not step_losses:
            return
        self.optimizer.zero_grad(set_to_none=True)
        objective = sum(
            torch.exp(-self.log_variances[task]) * (self.static_weights[task] * loss)
            + self.log_variances[task]
            for task, loss in step_losses.items()
        )
        objective.backward()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        tasks = list(self.static_weights)
        optimizer_state = self.optimizer.state_dict()
        return {
            "method": self.method,
            "tasks": tasks,
            "log_variances": {task: self.log_variances[task].item() for task in tasks},
            # Adam's per-tensor state is 0-dim tensors here (step, exp_avg, exp_avg_sq): stored as floats.
            "adam": {
                tasks[index]: {key: value.item() for key, value in moments.items()}
                for index, moments in optimizer_state["state"].items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.method, self.static_weights)
        tasks = list(self.static_weights)
        with torch.no_grad():
            for task, value in state["log_variances"].items():
                self.log_variances[task].fill_(value)
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {
            tasks.index(task): {
                key: torch.tensor(value, dtype=torch.float32) for key, value in moments.items()
            }
            for task, moments in state["adam"].items()
        }
        self.optimizer.load_state_dict(optimizer_state)


class DynamicWeightAverage:
    """Liu et al.'s DWA: weights from the rate at which each task's loss falls.

    Args:
        static_weights: task name -> loss_weight.
        temperature: softmax temperature T; larger is closer to equal weights.
        window: steps per loss measurement (the paper's epoch).
    """

    method = "dwa"

    def __init__(self, static_weights: Mapping[str, float], temperature: float, window: int):
        self.static_weights = dict(static_weights)
        self.temperature = temperature
        self.window = window
        tasks = list(self.static_weights)
        self.factors = dict.fromkeys(tasks, 1.0)
        # Mean loss per task of the last two completed periods (None: the task did not train in it).
        self.last_means: dict[str, float | None] = dict.fromkeys(tasks)
        self.previous_means: dict[str, float | None] = dict.fromkeys(tasks)
        self.period_sums = dict.fromkeys(tasks, 0.0)
        self.period_counts = dict.fromkeys(tasks, 0)
        self.steps_in_period = 0

    def weights(self) -> dict[str, float]:
        return {task: weight * self.factors[task] for task, weight in self.static_weights.items()}

    def update(self, step_losses: Mapping[str, float]) -> None:
        _check_losses(step_losses, self.static_weights)
        for task, loss in step_losses.items():
            self.period_sums[task] += loss
            self.period_counts[task] += 1
        self.steps_in_period += 1
        if self.steps_in_period == self.window:
            self._close_period()

    def _close_period(self) -> None:
        self.previous_means = self.last_means
        self.last_means = {
            task: self.period_sums[task] / count if count else None
            for task, count in self.period_counts.items()
        }
        self.period_sums = dict.fromkeys(self.static_weights, 0.0)
        self.period_counts = dict.fromkeys(self.static_weights, 0)
        self.steps_in_period = 0
        # A task not measured in both periods (or with a zero loss) has no rate yet: ratio 1.
        ratios = {
            task: last / previous if last is not None and previous else 1.0
            for task, last, previous in (
                (t, self.last_means[t], self.previous_means[t]) for t in self.static_weights
            )
        }
        exponentials = {task: math.exp(ratio / self.temperature) for task, ratio in ratios.items()}
        normaliser = sum(exponentials.values())
        self.factors = {task: len(ratios) * value / normaliser for task, value in exponentials.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tasks": list(self.static_weights),
            "factors": dict(self.factors),
            "last_means": dict(self.last_means),
            "previous_means": dict(self.previous_means),
            "period_sums": dict(self.period_sums),
            "period_counts": dict(self.period_counts),
            "steps_in_period": self.steps_in_period,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.method, self.static_weights)
        self.factors = dict(state["factors"])
        self.last_means = dict(state["last_means"])
        self.previous_means = dict(state["previous_means"])
        self.period_sums = dict(state["period_sums"])
        self.period_counts = dict(state["period_counts"])
        self.steps_in_period = state["steps_in_period"]


def build_balancer(config: LossBalancingConfig, static_weights: Mapping[str, float]) -> LossBalancer:
    """The balancer `config.method` names, over the tasks of `static_weights` (task -> loss_weight)."""
    if config.method == "static":
        return StaticWeights(static_weights)
    if config.method == "uncertainty":
        return UncertaintyWeighting(static_weights, config.lr)
    if config.method == "dwa":
        return DynamicWeightAverage(static_weights, config.temperature, config.window)
    raise ValueError(
        f"unknown train.loss_balancing.method {config.method!r}; expected static, uncertainty or dwa"
    )
