"""Task schedule: which task(s) every rank trains on at each optimizer step.

Three strategies, after the two families of multi-task MoE training:

- ``"all"``: every task every step, one micro-batch per task accumulated into one optimizer step
  (AdaMV-MoE, Chen et al., ICCV 2023): every task router gets a gradient at every step.
- ``"weighted"``: one task per step, drawn at random (Uni-Perceiver-MoE, Zhu et al., NeurIPS 2022).
  The step probabilities come from fixed ``ratios`` or from dataset sizes with a temperature,
  ``p_t ∝ n_t^(1/T)`` (the temperature sampling of multilingual training, Arivazhagan et al. 2019):
  ``T = 1`` is proportional to size, ``T → ∞`` (``math.inf``) is uniform.
- ``"round_robin"``: one task per step, cycling through the tasks in order.

Why the plan is a pure function of ``(seed, step)``
---------------------------------------------------
DeepSpeed-style expert parallelism exchanges tokens with all-to-all collectives inside every MoE
layer. Every rank of an expert-parallel group must therefore run the same sequence of MoE forwards,
or the collectives pair up wrongly and hang (DeepSpeed issues 5070, 5794, 7141). The number of MoE
layer calls in a step is ``len(tasks_at(step)) x (MoE layers per forward)``, so ranks agree as soon as
they agree on ``tasks_at(step)``. Here the weighted draw for step ``s`` is the ``s``-th output of
SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) seeded with ``seed``, computed directly from the
counter: no RNG object carries state between steps. Every rank holding the same configuration
computes the same task sequence without any communication, a resumed run needs no schedule state
(the step number is enough), and the plan of step 10_000 costs as much as the plan of step 0.

With heterogeneous data each rank reads different samples (see :mod:`moevit.data.multitask`); only
the task plan must agree, not the samples: a dropless MoE layer exchanges per-expert token counts
before the tokens, so different images on different ranks are fine, a different *number of forwards*
is not.

Sampling ratios: the mutual-information loss of Mod-Squad needs the real task prior P(t), i.e. the
fraction of training samples that come from each task. With per-task batch sizes ``b_t`` and step
probability ``p_t`` (1 for every task under ``"all"``), that fraction is ``p_t b_t / sum_s p_s b_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moevit.config.schema import Config

STRATEGIES = ("all", "weighted", "round_robin")

_UINT64_MASK = (1 << 64) - 1
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
# Counting steps in chunks bounds memory when ratios are measured over millions of steps.
_COUNT_CHUNK = 1 << 20


def splitmix64_uniform(seed: int, steps: np.ndarray) -> np.ndarray:
    """The ``steps``-th outputs of SplitMix64 seeded with ``seed``, as floats in [0, 1).

    uint64 arithmetic wraps modulo 2**64 in numpy arrays, which is exactly what SplitMix64 needs.
    """
    state = np.uint64(seed & _UINT64_MASK) + (steps.astype(np.uint64) + np.uint64(1)) * _SPLITMIX_GAMMA
    mixed = (state ^ (state >> np.uint64(30))) * _SPLITMIX_MUL1
    mixed = (mixed ^ (mixed >> np.uint64(27))) * _SPLITMIX_MUL2
    mixed = mixed ^ (mixed >> np.uint64(31))
    # The top 53 bits fill a double's mantissa exactly.
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


class TaskSchedule:
    """Decides the tasks trained at each step as a pure function of ``(seed, step)``.

    Args:
        tasks: task names; their order is the order of micro-batches under ``"all"`` and the cycle
            order under ``"round_robin"``.
        strategy: one of ``"all"``, ``"weighted"``, ``"round_robin"``.
        ratios: ``"weighted"`` only: relative probability that a step trains each task (every task
            listed, positive, normalised here).
        dataset_sizes: ``"weighted"`` only, instead of ``ratios``: number of samples of each task;
            step probabilities become ``n_t^(1/temperature)``, normalised. With neither ``ratios`` nor
            ``dataset_sizes`` the weighted draw is uniform.
        temperature: exponent divisor applied to ``dataset_sizes``; > 0, ``math.inf`` for uniform.
        seed: seed of the weighted draw; every rank must use the same one.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        strategy: str = "all",
        *,
        ratios: Mapping[str, float] | None = None,
        dataset_sizes: Mapping[str, int] | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("TaskSchedule needs at least one task, got none")
        duplicates = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if duplicates:
            raise ValueError(f"TaskSchedule: duplicate task names {duplicates} in tasks {list(self.tasks)}")
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown schedule strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"TaskSchedule seed must be an int, got {seed!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"schedule temperature must be > 0 (math.inf for uniform), got {temperature!r}")
        self.strategy = strategy
        self.seed = seed
        if strategy != "weighted" and (ratios or dataset_sizes or temperature != 1.0):
            raise ValueError(
                f"schedule strategy {strategy!r} takes no ratios, dataset_sizes or temperature "
                "(only 'weighted' does)"
            )
        self.step_probabilities = self._step_probabilities(ratios, dataset_sizes, temperature)
        self._cumulative = np.cumsum([self.step_probabilities[t] for t in self.tasks])

    def _step_probabilities(
        self,
        ratios: Mapping[str, float] | None,
        dataset_sizes: Mapping[str, int] | None,
        temperature: float,
    ) -> dict[str, float]:
        """Probability that a step trains each task (1.0 for every task under ``"all"``)."""
        if self.strategy == "all":
            return dict.fromkeys(self.tasks, 1.0)
        if self.strategy == "round_robin":
            return dict.fromkeys(self.tasks, 1.0 / len(self.tasks))
        if ratios and dataset_sizes:
            raise ValueError("weighted schedule: give either ratios or dataset_sizes, not both")
        if ratios:
            if temperature != 1.0:
                raise ValueError(
                    "weighted schedule: temperature applies to dataset_sizes, not to fixed ratios"
                )
            self._check_covers_tasks("ratios", ratios)
            for task, ratio in ratios.items():
                if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
                    raise ValueError(
                        f"weighted schedule: ratios[{task!r}] must be a finite number > 0, got {ratio!r}"
                    )
            log_weights = np.log([float(ratios[t]) for t in self.tasks])
        elif dataset_sizes:
            self._check_covers_tasks("dataset_sizes", dataset_sizes)
            for task, size in dataset_sizes.items():
                if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    raise ValueError(
                        f"weighted schedule: dataset_sizes[{task!r}] must be an int > 0, got {size!r}"
                    )
            # Log space: n^(1/T) overflows a double for large n and small T.
            log_weights = np.log([float(dataset_sizes[t]) for t in self.tasks]) / temperature
        else:
            log_weights = np.zeros(len(self.tasks))
        weights = np.exp(log_weights - log_weights.max())
        return dict(zip(self.tasks, (weights / weights.sum()).tolist()))

    def _check_covers_tasks(self, name: str, values: Mapping[str, object]) -> None:
        unknown = sorted(set(values) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"weighted schedule: {name} name unknown tasks {unknown}; tasks are {list(self.tasks)}"
            )
        missing = [t for t in self.tasks if t not in values]
        if missing:
            raise ValueError(
                f"weighted schedule: {name} miss tasks {missing}; every task needs a positive value"
            )

    def tasks_at(self, step: int) -> tuple[str, ...]:
        """The tasks trained at ``step``, in micro-batch order."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self.strategy == "all":
            return self.tasks
        return (self.tasks[int(self._task_indices(np.array([step]))[0])],)

    def _task_indices(self, steps: np.ndarray) -> np.ndarray:
        """Index of the single task trained at each of ``steps`` (strategies with one task per step)."""
        if self.strategy == "round_robin":
            return steps % len(self.tasks)
        draws = splitmix64_uniform(self.seed, steps)
        # Rounding can leave the last cumulative probability a hair below 1.
        return np.minimum(np.searchsorted(self._cumulative, draws, side="right"), len(self.tasks) - 1)

    def task_counts(self, num_steps: int, start: int = 0) -> dict[str, int]:
        """How many of the steps in ``[start, start + num_steps)`` train each task."""
        if num_steps < 0 or start < 0:
            raise ValueError(f"task_counts needs num_steps >= 0 and start >= 0, got {num_steps}, {start}")
        if self.strategy == "all":
            return dict.fromkeys(self.tasks, num_steps)
        counts = np.zeros(len(self.tasks), dtype=np.int64)
        for chunk_start in range(start, start + num_steps, _COUNT_CHUNK):
            steps = np.arange(chunk_start, min(chunk_start + _COUNT_CHUNK, start + num_steps), dtype=np.int64)
            counts += np.bincount(self._task_indices(steps), minlength=len(self.tasks))
        return dict(zip(self.tasks, counts.tolist()))

    def expected_ratios(self, batch_sizes: Mapping[str, int] | None = None) -> dict[str, float]:
        """Expected fraction of training samples drawn from each task.

        Args:
            batch_sizes: per-task micro-batch size; ``None`` counts every micro-batch as one sample.
        """
        sizes = self._batch_sizes(batch_sizes)
        mass = {t: self.step_probabilities[t] * sizes[t] for t in self.tasks}
        total = sum(mass.values())
        return {t: m / total for t, m in mass.items()}

    def empirical_ratios(
        self, num_steps: int, batch_sizes: Mapping[str, int] | None = None
    ) -> dict[str, float]:
        """Fraction of training samples drawn from each task over steps ``[0, num_steps)``."""
        if num_steps <= 0:
            raise ValueError(f"empirical_ratios needs num_steps > 0, got {num_steps}")
        sizes = self._batch_sizes(batch_sizes)
        samples = {t: n * sizes[t] for t, n in self.task_counts(num_steps).items()}
        total = sum(samples.values())
        return {t: s / total for t, s in samples.items()}

    def _batch_sizes(self, batch_sizes: Mapping[str, int] | None) -> dict[str, int]:
        if batch_sizes is None:
            return dict.fromkeys(self.tasks, 1)
        if set(batch_sizes) != set(self.tasks):
            raise ValueError(
                f"batch_sizes must name exactly the schedule's tasks {list(self.tasks)}, got {sorted(batch_sizes)}"
            )
        for task, size in batch_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"batch_sizes[{task!r}] must be an int > 0, got {size!r}")
        return dict(batch_sizes)

    def __repr__(self) -> str:
        probabilities = ", ".join(f"{t}={p:.3f}" for t, p in self.step_probabilities.items())
        return f"TaskSchedule(strategy={self.strategy!r}, seed={self.seed}, step_probabilities=({probabilities}))"


def build_schedule(cfg: Config, dataset_sizes: Mapping[str, int]) -> TaskSchedule:
    """`cfg.train.sampling` as a TaskSchedule; the weighted draw without ratios uses dataset sizes.

    The one place a config becomes a schedule: the training loader and the epoch count of
    moevit.data.coverage (what `moevit plan` and the training start report) both call it.
    """
    sampling = cfg.train.sampling
    if sampling.strategy != "weighted":
        return TaskSchedule(list(cfg.tasks), sampling.strategy, seed=cfg.seed)
    if sampling.ratios is not None:
        return TaskSchedule(list(cfg.tasks), "weighted", ratios=sampling.ratios, seed=cfg.seed)
    if sampling.temperature is None:  # neither ratios nor temperature: uniform over tasks
        return TaskSchedule(list(cfg.tasks), "weighted", seed=cfg.seed)
    return TaskSchedule(
        list(cfg.tasks),
        "weighted",
        dataset_sizes=dict(dataset_sizes),
        temperature=sampling.temperature,
        seed=cfg.seed,
    )
