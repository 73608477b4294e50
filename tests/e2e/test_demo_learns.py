"""The demo's recipe learns (issue 5): a few dozen steps of `moevit train --nproc 2` (EP=2) on the tiny
synthetic data make every task's loss fall and the classification and detection metrics beat chance.

The model is the demo's, shrunk (moevit_debug width, 4 experts) so the run takes about a minute; the
heads, data formats, image sizes, routing, MI loss and expert parallelism are the demo's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 40
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# Chance levels on the tiny validation splits, with a margin: 10 classes (top-1 0.1); a detector that
# has learned nothing scores no box AP50. Segmentation is the slow task (textures: no other task needs
# them): in 40 steps of this small model its loss falls by ~12 % but its metric stays near chance
# (measured: mIoU 0.13, aAcc 0.25; still 0.12 / 0.23 after 60 steps at lr 3e-3), so only its loss is
# checked here; the demo itself reaches mIoU 0.58 (README).
BEATS_CHANCE = {"imagenet": ("top1", 0.3), "coco": ("bbox_mAP_50", 0.05)}
# Required fall of the mean loss of the last two logged windows against the first two.
LOSS_FALL = {"imagenet": 0.8, "coco": 0.8, "ade20k": 0.92}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth_root):
    root = tmp_path_factory.mktemp("demo_learns")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["model"] = {
        "name": "moevit_debug",
        "img_size": 64,
        "patch_size": 8,
        "moe": {"num_experts": 4, "top_k": 2, "task_embedding": True},
    }
    for name, batch_size in (("imagenet", 16), ("coco", 4), ("ade20k", 8)):
        data = config["tasks"][name]["data"]
        data.update(root=str(synth_root / data["format"]), batch_size=batch_size)
    config["tasks"]["coco"]["head_options"]["out_channels"] = 32
    config["tasks"]["ade20k"]["head_options"]["channels"] = 32
    config["train"].update(steps=STEPS, log_every=5, num_workers=0, optim={"lr": 2.0e-3, "warmup_steps": 5})
    config["output_dir"] = str(root / "run")
    path = root / "learns.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "moevit.cli", "train", str(path), "--nproc", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("task", sorted(LOSS_FALL))
def test_loss_falls(trained_run, task):
    losses = [r["loss"] for r in trained_run if r["split"] == "train" and r["task"] == task]
    assert len(losses) == STEPS // 5
    assert sum(losses[-2:]) / 2 < LOSS_FALL[task] * (sum(losses[:2]) / 2), losses


@pytest.mark.timeout(600)
@pytest.mark.parametrize("task", sorted(BEATS_CHANCE))
def test_metric_beats_chance(trained_run, task):
    metric, chance = BEATS_CHANCE[task]
    (final,) = [r for r in trained_run if r["split"] == "eval" and r["task"] == task]
    assert final[metric] > chance, final
