"""Run reporting: metrics.jsonl records, their averaging, resume truncation, TensorBoard, rank-0 only."""

import json

import pytest
import torch

from moevit.train.logging import RunLogger
from moevit.train.step import StepResult


def result(loss_a: float, images: int = 6, mutual_information: float | None = -0.1) -> StepResult:
    return StepResult(
        task_losses={"a": {"loss": loss_a, "weight": 1.0}, "b": {"loss": 2.0, "weight": 0.5}},
        mutual_information=mutual_information,
        total=loss_a + 1.0,
        images=images,
        expert_counts={"blocks.1.mlp": {"a": torch.tensor([1, 2])}},
    )


NONE_SKIPPED = {"a": 0, "b": 0}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_logger(tmp_path, start_step=0, log_every=2, enabled=True):
    return RunLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", 10, start_step, log_every, enabled)


def test_train_records_average_the_steps_since_the_last_record(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_step(1, result(1.0), lr=0.1, seconds=1.0, skipped={"a": 0, "b": 1})
    assert read_lines(tmp_path / "metrics.jsonl") == []  # log_every=2
    logger.log_step(2, result(3.0), lr=0.2, seconds=2.0, skipped={"a": 0, "b": 3})
    logger.close()
    a, b, step = read_lines(tmp_path / "metrics.jsonl")
    assert a == {
        "step": 2,
        "split": "train",
        "task": "a",
        "loss": 2.0,
        "weight": 1.0,
        "corrupt_samples_skipped": 0,
    }
    assert b["task"] == "b" and b["loss"] == 2.0 and b["corrupt_samples_skipped"] == 3  # a running total
    assert step["task"] is None and step["split"] == "train"
    assert step["total_loss"] == 3.0 and step["mutual_information"] == pytest.approx(-0.1)
    assert step["lr"] == 0.2 and step["images_per_second"] == pytest.approx(12 / 3.0)


def test_eval_records_and_tensorboard_events(tmp_path):
    logger = make_logger(tmp_path, log_every=1)
    logger.log_step(1, result(1.0, mutual_information=None), lr=0.1, seconds=1.0, skipped=NONE_SKIPPED)
    logger.log_eval(1, {"a": {"top1": 0.5, "top5": 1.0}})
    logger.close()
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert lines[-1] == {"step": 1, "split": "eval", "task": "a", "top1": 0.5, "top5": 1.0}
    assert "mutual_information" not in lines[-2]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    logger = make_logger(tmp_path, log_every=1)
    for step in (1, 2, 3):
        logger.log_step(step, result(1.0), lr=0.1, seconds=1.0, skipped=NONE_SKIPPED)
    logger.close()
    resumed = make_logger(tmp_path, start_step=2, log_every=1)
    resumed.log_step(3, result(5.0), lr=0.1, seconds=1.0, skipped=NONE_SKIPPED)
    resumed.close()
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1] * 3 + [2] * 3 + [3] * 3
    assert [line["loss"] for line in lines if line["step"] == 3 and line["task"] == "a"] == [5.0]


def test_other_ranks_write_nothing(tmp_path):
    logger = make_logger(tmp_path, log_every=1, enabled=False)
    logger.log_step(1, result(1.0), lr=0.1, seconds=1.0, skipped=NONE_SKIPPED)
    logger.log_eval(1, {"a": {"top1": 0.5}})
    logger.close()
    assert list(tmp_path.iterdir()) == []


class RecordingSink:
    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def close(self):
        self.closed = True


def test_speed_fields_reach_metrics_tensorboard_and_sinks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moevit.train.throughput import Throughput

    sink = RecordingSink()
    speed = Throughput(total_steps=10, world_size=2, gflops_per_image={"a": 1.0, "b": 1.0}, peak_tflops=1.0)
    logger = RunLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", 10, 0, 2, True, speed, [sink])
    logger.log_step(
        1, result(1.0), 0.1, seconds=1.0, skipped=NONE_SKIPPED, data_wait=0.5, task_images={"a": 4}
    )
    logger.log_step(
        2, result(1.0), 0.1, seconds=1.0, skipped=NONE_SKIPPED, data_wait=0.0, task_images={"a": 4, "b": 2}
    )
    logger.log_eval(2, {"a": {"top1": 0.5}})
    logger.close()
    a, b, step, _ = read_lines(tmp_path / "metrics.jsonl")
    assert a["images_per_second"] == 4.0 and b["images_per_second"] == 1.0
    assert step["step_seconds"] == 1.0 and step["data_wait_share"] == 0.25 and step["eta_seconds"] == 8.0
    assert step["mfu"] == pytest.approx(3 * 10e9 / (2.0 * 2 * 1e12))
    assert {"train/step_seconds", "train/mfu", "train/a/images_per_second"} <= set(
        EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    )
    (_, task_a), (_, _), (_, whole_step) = sink.logged[:3]  # in the order of the metrics.jsonl lines
    assert task_a["train/a/images_per_second"] == 4.0 and whole_step["train/mfu"] == step["mfu"]
    assert sink.logged[3] == (2, {"eval/a/top1": 0.5}) and sink.closed
