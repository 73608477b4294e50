"""The benchmarks still run: each one's main at a tiny size, in-process. Speed is never asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:  # the benchmarks import their shared step_helpers.py, as scripts do
        sys.path.append(str(BENCHMARKS))  # last: benchmarks/data.py must not shadow anything
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


# What the GPU machine lacks; blocking them (None in sys.modules) makes `import X` fail as if absent.
MISSING_ON_THE_GPU_MACHINE = ("deepspeed", "pycocotools", "webdataset", "fvcore")
# The device's command (docs/performance.md) runs the script by path from the source tree, not installed.
RUN_WITHOUT = (
    "import runpy, sys; "
    "[sys.modules.__setitem__(name, None) for name in {names!r}]; "
    "sys.path.insert(0, 'benchmarks'); sys.argv = ['benchmarks/gpu_check.py', *sys.argv[1:]]; "
    "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
)
CPU_STATUSES = {
    "environment": "ok",
    "train_step_bf16": "ok",
    "fp16_loss_scaling": "ok",
    "tf32": "skipped: TF32 is a CUDA setting",
    "pinned_non_blocking": "skipped: pinned memory and non_blocking copies need CUDA",
    "moe_layer": "ok",
    "nccl_parity": "ok",  # over gloo, 2 CPU processes
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("optional_packages", ["installed", "missing"])
def test_gpu_check_cpu_smoke_reports_every_part(tmp_path, optional_packages):
    """--cpu-smoke as CI runs it, in a subprocess with PYTHONPATH (moevit not installed there), once as
    here and once with DeepSpeed, pycocotools, webdataset and fvcore made unimportable, as on the GPU
    machine."""
    out = tmp_path / "gpu_check.json"
    script = (
        ["-c", RUN_WITHOUT.format(names=MISSING_ON_THE_GPU_MACHINE)]
        if optional_packages == "missing"
        else ["benchmarks/gpu_check.py"]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *script, "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    missing = optional_packages == "missing"
    expected = dict(CPU_STATUSES)
    if missing:
        expected["nccl_parity"] = "skipped: deepspeed not installed; NCCL parity unmeasured"
    errors = {name: part.get("error") for name, part in parts.items() if part["status"] == "error"}
    assert {name: part["status"] for name, part in parts.items()} == expected, errors
    assert report["finished"] and report["mode"] == "cpu-smoke"
    assert all(part["seconds"] >= 0 for part in parts.values())

    environment = parts["environment"]
    assert environment["optional_packages_imported_by_this_script"] == []
    assert environment["optional_packages"] == dict.fromkeys(MISSING_ON_THE_GPU_MACHINE, not missing)

    train = parts["train_step_bf16"]["contenders"]
    assert "dense" in train and len(train) >= 2
    # the expert-parallel wrapper `moevit train` runs (DeepSpeed's MoE layer) where DeepSpeed is there
    assert any(name.endswith("-ep1") for name in train) != missing
    moe_rows = [row for name, row in train.items() if name != "dense"]
    for row in moe_rows:
        assert row["median_step_s"] > 0 and row["ratio_to_dense"] > 0 and row["mfu"] is None  # no CPU peak
        # equal active FLOPs up to the routers and the combine, which only the MoE model has
        dense_gflops = train["dense"]["backbone_forward_gflops_per_step"]
        assert dense_gflops <= row["backbone_forward_gflops_per_step"] < 1.05 * dense_gflops
    assert train["dense"]["param_groups"] == (
        "one group (deepspeed not importable)" if missing else "the engine's groups"
    )

    fp16 = parts["fp16_loss_scaling"]
    assert fp16["updates"] >= 1 and fp16["loss_scaler"].startswith("torch.amp.GradScaler")
    if missing:
        assert fp16["deepspeed_engine"] == "skipped: deepspeed not installed"
    else:  # the DeepSpeed engine's code path, fp32 on the CPU
        assert fp16["deepspeed_engine"]["updates"] == len(fp16["deepspeed_engine"]["steps"]) > 0

    layer = parts["moe_layer"]
    assert layer["deepspeed"] == ("skipped: deepspeed not installed" if missing else "measured")
    row = layer["rows"][0]
    assert row["loop_over_b"] > 0 and row["grouped_over_b"] > 0 and row["grouped_over_loop"] > 0
    assert ("c deepspeed" in row["median_s"]) != missing
    assert layer["grouped_fallbacks"] == []  # fp32 on the CPU: the grouped GEMM itself ran
    if not missing:  # the EP=1 / EP=2 parity code, run over gloo
        parity = parts["nccl_parity"]
        assert parity["backend"].startswith("gloo") and len(parity["losses"]["ep2"]) == parity["steps"]
        assert parity["max_weight_difference"] <= parity["tolerance"]
    print(f"gpu_check --cpu-smoke ({optional_packages} optional packages): {seconds:.1f} s")


def test_gpu_check_records_a_failing_part_and_goes_on(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    report = gpu_check.Report(tmp_path / "report.json", "test")
    assert json.loads(report.path.read_text())["parts"]["environment"] == {"status": "pending"}

    def broken() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    report.run("moe_layer", broken)
    written = json.loads(report.path.read_text())["parts"]  # on disk at once: a cut-off run still reports
    assert written["moe_layer"]["status"] == "error"
    assert written["moe_layer"]["error"]["type"] == "RuntimeError"
    assert "illegal memory access" in written["moe_layer"]["error"]["message"]
    assert "in broken" in written["moe_layer"]["error"]["traceback"]
    report.run("tf32", lambda: {"status": "skipped: no GPU"})
    written = json.loads(report.path.read_text())["parts"]
    assert written["tf32"]["status"] == "skipped: no GPU" and written["nccl_parity"] == {"status": "pending"}
