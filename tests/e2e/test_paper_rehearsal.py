"""The true-resolution rehearsal (issue 15): `moevit train configs/paper/moevit_s16_hetero.yaml --nproc 2` with
expert parallelism over both processes, on `moevit data synth --size real` data (ImageNet-, COCO- and
ADE20K-format images at their real sizes), for 4 steps, then evaluation of every task on its val split with the
real protocols (timm's eval crop, COCO boxes mapped back to original pixels for COCOeval, ADE20K slide inference
at the original resolution).

Only the model and the batches shrink, with the overrides the config's header lists; resolutions (224 / 1024 /
512), augmentation and evaluation protocols are the config's own. The seed is one whose first 4 weighted draws
include every task, so that each task trains at least once.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper" / "moevit_s16_hetero.yaml"


def header_overrides(config: Path) -> list[str]:
    """The shrinking overrides listed under "CPU rehearsal" in the config's header (one source of truth)."""
    lines = config.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# CPU rehearsal"))
    overrides = []
    for line in lines[start + 1 :]:
        if not line.startswith("#  "):
            break
        overrides += [word for word in line.lstrip("# ").split() if "=" in word]
    return overrides


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    data = root / "data"
    synth = [sys.executable, "-m", "moevit.cli", "data", "synth", "--out", str(data), "--size", "real"]
    done = subprocess.run(synth, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = root / "run"
    command = [
        sys.executable, "-m", "moevit.cli", "train", str(CONFIG), "--nproc", "2",
        *(f"tasks.{task}.data.root={data / task}" for task in ("imagenet", "coco", "ade20k")),
        *header_overrides(CONFIG),
        "train.steps=4", "train.log_every=1", f"output_dir={run_dir}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, done.stdout + done.stderr


def test_the_header_lists_the_shrinking_overrides():
    overrides = header_overrides(CONFIG)
    assert "parallel.ep_size=2" in overrides and "model.depth=4" in overrides
    # Nothing that changes the resolution or the recipe:
    assert not [o for o in overrides if "image_size" in o or ".transforms." in o]


@pytest.mark.timeout(1500)
def test_every_task_trains_at_true_resolution(rehearsal):
    records, _ = rehearsal
    # A task's record carries its "loss" at the steps that trained it.
    trained = {r["task"] for r in records if r.get("split") == "train" and "loss" in r}
    assert trained == {"imagenet", "coco", "ade20k"}, trained
    assert all(math.isfinite(r["loss"]) for r in records if r.get("split") == "train" and "loss" in r)


@pytest.mark.timeout(1500)
def test_every_task_is_evaluated_with_its_protocol(rehearsal):
    records, _ = rehearsal
    final = {r["task"]: r for r in records if r.get("split") == "eval"}
    assert set(final) == {"imagenet", "coco", "ade20k"}
    assert 0 <= final["imagenet"]["top1"] <= 1
    assert 0 <= final["coco"]["bbox_mAP"] <= 1 or math.isnan(final["coco"]["bbox_mAP"])
    assert 0 <= final["ade20k"]["mIoU"] <= 1
