"""What a training run reports, written by rank 0 only: a progress bar, metrics.jsonl and TensorBoard events.

metrics.jsonl holds one JSON object per line, each with ``step`` (optimizer steps completed), ``split``
(``"train"`` or ``"eval"``) and ``task`` (``null`` for values of the whole step), then metric keys:

    {"step": 10, "split": "train", "task": "imagenet", "loss": 2.1, "load_balance": 1.0, "z_loss": 0.0, "weight": 1.0}
    {"step": 10, "split": "train", "task": null, "total_loss": 5.3, "mutual_information": -0.01, "lr": 0.001,
     "images_per_second": 210.4, "nonfinite_steps_skipped": 0, "step_seconds": 0.21, "data_wait_share": 0.02,
     "eta_seconds": 3150.0, "model_tflops_per_device": 301.2, "mfu": 0.304}
    {"step": 10, "split": "eval", "task": "imagenet", "top1": 0.31, "top5": 0.82}

Train values are means over ranks and over the steps since the previous line (steps skipped for a NaN
or inf loss are left out of the means; ``nonfinite_steps_skipped`` counts them since the run began); eval
metrics are fractions in [0, 1]. The speed fields (per task ``images_per_second``; per step
``step_seconds``, ``data_wait_share``, ``eta_seconds``, ``model_tflops_per_device``, ``mfu``) cover the
same window (moevit.train.throughput). TensorBoard, and any other sink (a wandb run), get the same values
under ``train/<task>/<key>``, ``train/<key>`` and ``eval/<task>/<metric>`` in ``tb/``. On resume from
step S, lines and events after S are dropped first, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moevit.train.step import StepResult
from moevit.train.throughput import Throughput, format_duration

# The bar without tqdm's own remaining time (from its smoothed rate, evaluations included): the postfix
# starts with the ETA of moevit.train.throughput instead, the figure metrics.jsonl records.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class MetricSink(Protocol):
    """Another destination of every record (moevit.train.wandb_sink): flat {name: value} at a step."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def drop_lines_after(metrics_file: Path, step: int) -> None:
    """Keeps the lines of `metrics_file` with ``step <= step`` (what a checkpoint at `step` had seen)."""
    if not metrics_file.exists():
        return
    kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics_file.write_text("".join(line + "\n" for line in kept))


class RunLogger:
    """Rank 0's reporter; on other ranks (`enabled=False`) every method does nothing.

    Args:
        metrics_file: the run's metrics.jsonl (appended to).
        tb_dir: TensorBoard log directory.
        total_steps: steps of the whole run (for the bar's ETA).
        start_step: steps already done (0, or the resumed checkpoint's step).
        log_every: steps averaged into one metrics.jsonl/TensorBoard record.
        enabled: whether this process reports (rank 0).
        throughput: the speed fields' accumulator; None: one without FLOPs (no MFU).
        sinks: more destinations of every record, each value named as in TensorBoard (rank 0's).
    """

    def __init__(
        self,
        metrics_file: Path,
        tb_dir: Path,
        total_steps: int,
        start_step: int,
        log_every: int,
        enabled: bool,
        throughput: Throughput | None = None,
        sinks: Sequence[MetricSink] = (),
    ):
        self.enabled = enabled
        self.throughput = throughput or Throughput(total_steps)
        self.sinks = list(sinks)
        self.log_every = log_every
        self._sums: dict[tuple[str | None, str], float] = defaultdict(float)
        self._counts: dict[tuple[str | None, str], int] = defaultdict(int)
        self._images = 0
        self._seconds = 0.0
        self._skipped: dict[str, int] = {}
        self._nonfinite_skipped = 0
        if not enabled:
            return
        drop_lines_after(metrics_file, start_step)
        self._metrics = open(metrics_file, "a", encoding="utf-8")
        # purge_step hides events a crashed run wrote after the checkpoint it resumes from.
        self._tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
        )

    def log_step(
        self,
        step: int,
        result: StepResult,
        lr: float,
        seconds: float,
        skipped: Mapping[str, int],
        data_wait: float = 0.0,
        task_images: Mapping[str, int] | None = None,
    ) -> None:
        """Records one step; writes a record every `log_every` steps; updates the bar every step.

        `skipped`: corrupt samples skipped so far per task, over all ranks (moevit.data.skip);
        `data_wait`: the seconds of `seconds` spent waiting for the batch; `task_images`: {task: images
        of this step over all ranks}.
        """
        if not self.enabled:
            return
        self._skipped = dict(skipped)
        self._nonfinite_skipped = result.skipped_steps
        if result.skipped:
            self._bar.write(f"step {step}: NaN or inf loss on some rank; every rank skipped this update")
        else:
            for task, values in result.task_losses.items():
                for key, value in values.items():
                    self._add(task, key, value)
            self._add(None, "total_loss", result.total)
            if result.mutual_information is not None:
                self._add(None, "mutual_information", result.mutual_information)
        self._images += result.images
        self._seconds += seconds
        self.throughput.add(seconds, data_wait, task_images or {})
        self._bar.set_postfix_str(
            f"eta {format_duration(self.throughput.eta_seconds(step))}, "
            f"{result.images / max(seconds, 1e-9):.0f} img/s "
            + " ".join(f"{task}={values['loss']:.3f}" for task, values in result.task_losses.items()),
            refresh=False,
        )
        self._bar.update(1)
        if step % self.log_every == 0:
            self._flush_train(step, lr)

    def _add(self, task: str | None, key: str, value: float) -> None:
        self._sums[task, key] += value
        self._counts[task, key] += 1

    def _flush_train(self, step: int, lr: float) -> None:
        records: dict[str | None, dict[str, float]] = defaultdict(dict)
        for (task, key), total in self._sums.items():
            records[task][key] = total / self._counts[task, key]
        for task, count in self._skipped.items():
            records[task]["corrupt_samples_skipped"] = count
        records[None]["lr"] = lr
        records[None]["nonfinite_steps_skipped"] = self._nonfinite_skipped
        records[None]["images_per_second"] = self._images / max(self._seconds, 1e-9)
        per_task_speed, step_speed = self.throughput.record(step)
        for task, values in per_task_speed.items():
            records[task].update(values)
        records[None].update(step_speed)
        tasks = [task for task in records if task is not None] + [None]
        for task in tasks:
            self._write(step, "train", task, records[task])
        self._sums.clear()
        self._counts.clear()
        self._images, self._seconds = 0, 0.0

    def log_eval(self, step: int, metrics: dict[str, dict[str, float]]) -> None:
        if not self.enabled:
            return
        for task, values in metrics.items():
            self._write(step, "eval", task, values)
        summary = "  ".join(
            f"{task}: " + " ".join(f"{k}={v:.3f}" for k, v in values.items())
            for task, values in metrics.items()
        )
        self._bar.write(f"eval @ step {step}: {summary}")

    def message(self, text: str) -> None:
        """A line above the bar (rank 0)."""
        if self.enabled:
            self._bar.write(text)

    def _write(self, step: int, split: str, task: str | None, values: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({"step": step, "split": split, "task": task, **values}) + "\n")
        self._metrics.flush()
        prefix = f"{split}/{task}/" if task is not None else f"{split}/"
        for key, value in values.items():
            self._tb.add_scalar(prefix + key, value, step)
        for sink in self.sinks:
            sink.log({prefix + key: value for key, value in values.items()}, step)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._metrics.close()
            for sink in self.sinks:
                sink.close()
