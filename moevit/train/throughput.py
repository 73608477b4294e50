"""Speed of a training run over each log window: per-task images/s, step time, data wait, ETA and MFU.

Fed once per step by the loop (moevit.train.loop.train_one_step) with the step's wall seconds (from
asking the loader for the batch to the end of the update), the seconds of that spent waiting in the
loader's `next`, and each task's images over all ranks. Steps are timed on rank 0 only: every rank
ends a step at the same collective, so rank 0's wall time is the step's. Evaluation and checkpoint
time is outside the steps, so the ETA counts training steps only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from moevit.train.mfu import model_flops_utilization, training_flops

# The fields measured with the wall clock: two runs identical in every other value may differ in these.
WALL_CLOCK_FIELDS = frozenset(
    {"images_per_second", "step_seconds", "data_wait_share", "eta_seconds", "model_tflops_per_device", "mfu"}
)

# Steps whose mean time predicts the rest (the ETA): recent enough to follow a change of speed (an
# evaluation's cache effects, a task mix that changed), long enough to average out the per-step jitter.
ETA_WINDOW = 50


def format_duration(seconds: float) -> str:
    """A short human duration: "3d04h", "2h05m", "5m07s", "42s"."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Throughput:
    """Window sums of step time, data wait and images per task; `record` turns them into metrics.

    Args:
        total_steps: the run's last step (for the ETA).
        world_size: devices the run trains on (MFU divides by them).
        gflops_per_image: {task: forward GFLOPs per image} (moevit.train.mfu.forward_gflops_per_image);
            None: no FLOPs, no MFU.
        peak_tflops: one device's dense peak at the run's precision; None: MFU is not logged.
    """

    def __init__(
        self,
        total_steps: int,
        world_size: int = 1,
        gflops_per_image: Mapping[str, float] | None = None,
        peak_tflops: float | None = None,
    ):
        self.total_steps = total_steps
        self.world_size = world_size
        self.gflops_per_image = gflops_per_image
        self.peak_tflops = peak_tflops
        self._recent: deque[float] = deque(maxlen=ETA_WINDOW)
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._seconds = 0.0
        self._waited = 0.0
        self._images: dict[str, int] = {}

    def add(self, seconds: float, data_wait: float, task_images: Mapping[str, int]) -> None:
        """One step: its wall `seconds`, the part of them in the loader's `next`, {task: images, all ranks}."""
        self._steps += 1
        self._seconds += seconds
        self._waited += data_wait
        self._recent.append(seconds)
        for task, count in task_images.items():
            self._images[task] = self._images.get(task, 0) + count

    def eta_seconds(self, step: int) -> float:
        """Seconds left after `step`: remaining steps x the mean time of the last `ETA_WINDOW` steps."""
        if not self._recent:
            return 0.0
        return (self.total_steps - step) * sum(self._recent) / len(self._recent)

    def record(self, step: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """({task: {"images_per_second"}}, the step-wide fields) of the window ending at `step`; starts
        the next window."""
        seconds = max(self._seconds, 1e-9)
        per_task = {task: {"images_per_second": count / seconds} for task, count in self._images.items()}
        fields = {
            "step_seconds": self._seconds / max(self._steps, 1),
            # Clamped: the two clocks are read at different instants, so rounding could cross 1.
            "data_wait_share": min(1.0, self._waited / seconds),
            "eta_seconds": self.eta_seconds(step),
        }
        if self.gflops_per_image is not None:
            flops = training_flops(self._images, self.gflops_per_image)
            fields["model_tflops_per_device"] = flops / (seconds * self.world_size) / 1e12
            if self.peak_tflops is not None:
                fields["mfu"] = model_flops_utilization(flops, seconds, self.world_size, self.peak_tflops)
        self._reset()
        return per_task, fields
