"""The CLI end to end (issue 4, "done when"): `train --nproc 2` with EP=2 on the tiny synthetic data of all
three task types writes the run dir, resumes with `--resume auto`, and `eval` in one process at EP=1
reads the checkpoint back and reproduces the run's last evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from moevit.config import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCH_TIMEOUT_S = 240
EVAL_METRICS = {"imagenet": {"top1", "top5"}, "coco": {"bbox_mAP", "bbox_mAP_50"}, "ade20k": {"mIoU", "aAcc"}}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, synth_root, tiny_config):
    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(synth_root, root / "synth")  # a copy of its own: some of its files get truncated
    # Truncate every 4th training image of one task: training must skip, count and report them.
    for path in sorted((root / "synth" / "imagenet" / "train").glob("*/*.JPEG"))[::4]:
        path.write_bytes(path.read_bytes()[:200])

    # imagenet, coco and ade20k with the builder's train section, without eval_batches: evaluations cover
    # the whole val splits
    config = tiny_config(root / "synth", root / "run", parallel={"ep_size": 2})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def moevit(*args: str) -> subprocess.CompletedProcess:
    """`python -m moevit.cli ARGS`, the entry point `moevit train/eval` and the workers share."""
    command = [sys.executable, "-m", "moevit.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def read_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_records(records: list[dict], step: int) -> dict:
    """{task: {metric: value}} of the evaluation logged at `step`."""
    return {
        r["task"]: {k: v for k, v in r.items() if k not in ("step", "split", "task")}
        for r in records
        if r["split"] == "eval" and r["step"] == step
    }


def check_eval_metrics(metrics: dict) -> None:
    assert {task: set(values) for task, values in metrics.items()} == EVAL_METRICS
    assert all(0.0 <= value <= 1.0 for values in metrics.values() for value in values.values())


def test_train_writes_the_run_dir_resumes_and_evaluates(config_file, tmp_path):
    run_dir = config_file.parent / "run"
    moevit("train", str(config_file), "--nproc", "2")

    assert load_config(run_dir / "config.yaml") == load_config(config_file)
    records = read_records(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert {r["task"] for r in train} == {"imagenet", "coco", "ade20k", None}
    assert all("loss" in r and "weight" in r for r in train if r["task"] is not None)
    skipped = {r["task"]: r["corrupt_samples_skipped"] for r in train if r["task"] is not None}
    assert skipped["imagenet"] > 0 and skipped["coco"] == skipped["ade20k"] == 0
    check_eval_metrics(eval_records(records, step=2))
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    plots = sorted(path.name for path in (run_dir / "plots").iterdir())
    assert plots == [
        "usage_step0000002.json",
        "usage_step0000002_blocks.1.mlp.png",
        "usage_step0000002_blocks.3.mlp.png",
    ]

    resumed = moevit("train", str(config_file), "train.steps=4", "--nproc", "2", "--resume", "auto")
    assert "at step 2" in resumed.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    records = read_records(run_dir)
    assert [r["step"] for r in records if r["split"] == "train" and r["task"] is None] == [1, 2, 3, 4]
    final_eval = eval_records(records, step=4)
    check_eval_metrics(final_eval)

    # One process, EP=1: the checkpoint's experts were saved per global expert, so any layout reads them.
    output = tmp_path / "eval.json"
    moevit(
        "eval",
        str(run_dir / "config.yaml"),
        "parallel.ep_size=1",
        "--checkpoint",
        str(run_dir),
        "--json",
        str(output),
    )
    evaluated = json.loads(output.read_text())
    check_eval_metrics(evaluated)
    for task, values in final_eval.items():  # the same weights as the run's last evaluation
        assert evaluated[task] == pytest.approx(values, rel=1e-6), task
