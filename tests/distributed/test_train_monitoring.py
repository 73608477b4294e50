"""Monitoring of a real run (issue 16): a 2-rank training on the tiny data writes the speed fields to
metrics.jsonl, TensorBoard and a (stub) wandb run, with per-task images summed over both ranks and the MFU
of `moevit plan`'s FLOPs against the configured peak; resources.json holds the peak memory of the largest
rank (rank 1, made larger on purpose), not of rank 0 which writes it."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.train.loop import run_training
from moevit.train.mfu import forward_gflops_per_image
from moevit.train.plan import build_meta_model
from moevit.train.resources import RESOURCES_FILE, peak_memory_mib

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH = {"shapes": 8, "objects": 4}  # per rank
PEAK_TFLOPS = 0.5
RANK_1_BALLAST_MIB = 400


def peak_rss_mib() -> float:
    return peak_memory_mib(torch.device("cpu"))["peak_rss_mib"]


def train_with_stub_wandb(config: dict) -> tuple[list, tuple[float, float]]:
    """One rank: trains with a `wandb` stub importable (the preflight checks it on every rank); returns the
    stub's calls (rank 0's run only) and this process's peak RSS before and after training. Rank 1 holds
    RANK_1_BALLAST_MIB more memory throughout."""
    stub = types.ModuleType("wandb")
    stub.calls = []

    class Run:
        def log(self, values, step=None):
            stub.calls.append(("log", dict(values), step))

        def finish(self):
            stub.calls.append(("finish",))

    stub.init = lambda **kwargs: stub.calls.append(("init", kwargs["project"], kwargs["mode"])) or Run()
    sys.modules["wandb"] = stub
    ballast = torch.ones(RANK_1_BALLAST_MIB * 2**20 // 4) if os.environ["RANK"] == "1" else None
    before = peak_rss_mib()
    run_training(build_config(Config, config))
    del ballast
    return stub.calls, (before, peak_rss_mib())


def test_speed_fields_of_a_two_rank_run(tmp_path, synth_root, tiny_config, run_workers):
    config = tiny_config(
        synth_root,
        tmp_path / "run",
        datasets={"shapes": "imagenet", "objects": "imagenet"},
        batch_sizes=BATCH,
        train={"steps": 2, "eval_batches": 1, "peak_tflops": PEAK_TFLOPS, "wandb": {"enabled": True}},
        parallel={"ep_size": 2},
    )
    (rank0_calls, rank0_peaks), (rank1_calls, rank1_peaks) = run_workers(
        train_with_stub_wandb, WORLD_SIZE, 150, config=config
    )
    # resources.json: the largest rank's peak, which rank 0 (the writer) is not; a high-water mark,
    # so it lies between rank 1's peak before training and the larger peak after it.
    resources = json.loads((tmp_path / "run" / RESOURCES_FILE).read_text())
    assert set(resources) == {"peak_rss_mib"}
    assert rank1_peaks[0] <= resources["peak_rss_mib"] <= max(rank0_peaks[1], rank1_peaks[1]) + 0.05
    assert resources["peak_rss_mib"] > rank0_peaks[1] + RANK_1_BALLAST_MIB / 2

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
