"""Monitoring of a real run (issue 16): a 2-rank training on the tiny data writes the speed fields to
metrics.jsonl, TensorBoard and a (stub) wandb run, with per-task images summed over both ranks and the MFU
of `moevit plan`'s FLOPs against the configured peak."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.train.loop import run_training
from moevit.train.mfu import forward_gflops_per_image
from moevit.train.plan import build_meta_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH = {"shapes": 8, "objects": 4}  # per rank
PEAK_TFLOPS = 0.5


def train_with_stub_wandb(config: dict) -> list:
    """One rank: trains with a `wandb` stub importable (the preflight checks it on every rank); returns the
    stub's calls (rank 0's run only)."""
    stub = types.ModuleType("wandb")
    stub.calls = []

    class Run:
        def log(self, values, step=None):
            stub.calls.append(("log", dict(values), step))

        def finish(self):
            stub.calls.append(("finish",))

    stub.init = lambda **kwargs: stub.calls.append(("init", kwargs["project"], kwargs["mode"])) or Run()
    sys.modules["wandb"] = stub
    run_training(build_config(Config, config))
    return stub.calls


def test_speed_fields_of_a_two_rank_run(tmp_path, synth_root, tiny_config, run_workers):
    config = tiny_config(
        synth_root,
        tmp_path / "run",
        datasets={"shapes": "imagenet", "objects": "imagenet"},
        batch_sizes=BATCH,
        train={"steps": 2, "eval_batches": 1, "peak_tflops": PEAK_TFLOPS, "wandb": {"enabled": True}},
        parallel={"ep_size": 2},
    )
    rank0_calls, rank1_calls = run_workers(train_with_stub_wandb, WORLD_SIZE, 150, config=config)

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["split"] == "train" and r["task"] is None]
    tasks = {(r["step"], r["task"]): r for r in lines if r["split"] == "train" and r["task"] is not None}
    cfg = build_config(Config, config)
    gflops = forward_gflops_per_image(
        build_meta_model(cfg), {name: t.image_size for name, t in cfg.tasks.items()}
    )
    for record in steps:  # log_every=1: each window is one step
        seconds = record["step_seconds"]
        assert seconds > 0 and 0 <= record["data_wait_share"] <= 1
        images = {task: tasks[record["step"], task]["images_per_second"] * seconds for task in BATCH}
        assert images == pytest.approx({task: n * WORLD_SIZE for task, n in BATCH.items()})  # all ranks
        flops = 3 * sum(images[task] * gflops[task] * 1e9 for task in BATCH)
        assert record["mfu"] == pytest.approx(flops / (seconds * WORLD_SIZE * PEAK_TFLOPS * 1e12))
        assert record["model_tflops_per_device"] == pytest.approx(record["mfu"] * PEAK_TFLOPS)
    first, last = steps
    assert first["eta_seconds"] == pytest.approx(first["step_seconds"])  # 1 step left at the first's pace
    assert last["eta_seconds"] == 0

    tags = set(EventAccumulator(str(tmp_path / "run" / "tb")).Reload().Tags()["scalars"])
    assert {
        "train/mfu",
        "train/data_wait_share",
        "train/eta_seconds",
        "train/shapes/images_per_second",
    } <= tags

    assert rank1_calls == []  # rank 0 reports
    assert rank0_calls[0] == ("init", "moevit", "offline") and rank0_calls[-1] == ("finish",)
    logged = [(step, values) for _, values, step in rank0_calls[1:-1]]
    assert (
        2,
        {"train/" + key: value for key, value in last.items() if key not in ("step", "split", "task")},
    ) in logged
    assert any(step == 2 and "eval/shapes/top1" in values for step, values in logged)
