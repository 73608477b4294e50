"""The benchmarks still run: each one's main at a tiny size, in-process. Speed is never asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """The benchmarks set the thread count, and moe_layer.py OMP_WAIT_POLICY (inherited by later
    subprocesses): both go back to what they were."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_moe_layer_benchmark_runs_and_writes_its_ratios(tmp_path):
    out = tmp_path / "moe_layer.json"
    argv = [
        "--threads",
        "1",
        "--tokens",
        "64",
        "--dim",
        "16",
        "--expert-hidden",
        "32",
        "--configs",
        "4:1,4:2",
    ]
    load_benchmark("moe_layer").main(
        [*argv, "--no-vit-b", "--repeats", "2", "--warmup", "1", "--json", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["config"] for row in rows] == ["E4/k1", "E4/k2"]
    for row in rows:
        assert set(row["median_s"]) == {"a loop", "a grouped", "b dense", "c deepspeed"}
        assert all(len(samples) == 2 for samples in row["times_s"].values())
        for path in ("loop", "grouped"):
            assert row[f"{path}_over_b"] > 0 and row[f"{path}_over_c_paired"] > 0
        assert row["grouped_over_loop"] > 0


@pytest.mark.timeout(120)
def test_moe_layer_profile_mode_runs(capsys):
    argv = ["--threads", "1", "--tokens", "32", "--dim", "16", "--expert-hidden", "16", "--repeats", "1"]
    load_benchmark("moe_layer").main([*argv, "--profile", "4:2:grouped"])
    assert "profile of moevit E4/k2, expert path grouped" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_train_step_benchmark_runs_moe_and_dense_of_equal_active_flops(tmp_path):
    out = tmp_path / "train_step.json"
    tiny = [
        "model.img_size=32",
        "model.depth=4",
        "tasks.imagenet.data.image_size=32",
        "tasks.coco.data.image_size=32",
        "tasks.ade20k.data.image_size=32",
        "tasks.imagenet.data.batch_size=2",
        "tasks.coco.data.batch_size=2",
        "tasks.ade20k.data.batch_size=2",
    ]
    argv = [
        "--threads",
        "1",
        "--models",
        "moevit_tiny",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    load_benchmark("train_step").main([*argv, *tiny])
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["median_s"]) == {"moe", "moe-ep1", "dense"}
    assert row["images_per_step"] == 6
    gflops = row["backbone_forward_gflops_per_step"]
    # equal active FLOPs up to the routers and the combine, which only the MoE model has
    assert gflops["dense"] <= gflops["moe"] < 1.05 * gflops["dense"]


@pytest.mark.timeout(120)
def test_backbone_step_benchmark_runs(tmp_path, monkeypatch):
    out = tmp_path / "backbone.json"
    argv = ["--threads", "1", "--batch", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["backbone_step.py", *argv])
    load_benchmark("backbone_step").main()
    assert len(json.loads(out.read_text())["rows"]) == 3


@pytest.mark.timeout(180)
def test_data_benchmark_runs_and_compares_with_the_demo_consumption(tmp_path, monkeypatch):
    out = tmp_path / "data.json"
    argv = ["--workers", "0", "--batches", "1", "--warmup", "1", "--repeats", "1", "--step-seconds", "1.0"]
    monkeypatch.setattr(sys, "argv", ["data.py", *argv, "--json", str(out)])
    load_benchmark("data").main()
    rows = json.loads(out.read_text())["rows"]
    assert {(row["task"], row["pipeline"]) for row in rows} == {
        (task, pipeline) for task in ("imagenet", "coco", "ade20k") for pipeline in ("folder", "shards")
    }
    assert all(row["ratio"] > 0 for row in rows)
