"""5 % corrupt samples spread over the three datasets (issue 10): `moevit train --nproc 2` (EP=2) completes,
metrics.jsonl reports every corrupt sample once per task, and both ranks drew the same number of batches.

Batch sizes are chosen so that the run is exactly one epoch of every task's train split (8 steps:
ImageNet 160 = 8 x 2 ranks x 10, COCO and ADE20K 48 = 8 x 2 x 3). Corrupt files are never adjacent in
a reader's (sorted) order, so each is met exactly once (`SkipCorrupt` substitutes the next sample).
"""

from __future__ import annotations

import json
import shutil

import pytest
from fault_helpers import read_records, run_moevit, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8


def corrupt_every(paths, every: int, damage) -> int:
    chosen = sorted(paths)[every // 2 :: every]
    for path in chosen:
        damage(path)
    return len(chosen)


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def garbage(path) -> None:
    path.write_bytes(b"\x00not an image\xff" * 20)


@pytest.mark.timeout(300)
def test_training_survives_corrupt_samples_and_ranks_stay_in_step(synth_root, tmp_path, tiny_config):
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    ade = root / "ade20k" / "ADEChallengeData2016"
    corrupt = {
        "imagenet": corrupt_every((root / "imagenet" / "train").glob("*/*.JPEG"), 20, truncate),  # 8 of 160
        "coco": corrupt_every((root / "coco" / "train2017").glob("*.jpg"), 24, garbage),  # 2 of 48
        "ade20k": corrupt_every((ade / "annotations" / "training").glob("*.png"), 16, truncate),  # 3 of 48
    }
    assert sum(corrupt.values()) / (160 + 48 + 48) >= 0.05

    run_dir = tmp_path / "run"
    config = tiny_config(
        root,
        run_dir,
        batch_sizes={"imagenet": 10, "coco": 3, "ade20k": 3},
        tasks={"coco": {"head_options": {"out_channels": 32}}, "ade20k": {"head_options": {"channels": 32}}},
        train={"steps": STEPS, "eval_batches": 1, "checkpoint_every": 0},
        parallel={"ep_size": 2},
    )
    done = run_moevit("train", str(write_config(tmp_path / "train.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]

    last = {r["task"]: r for r in read_records(run_dir) if r["split"] == "train" and r["step"] == STEPS}
    assert {task: last[task]["corrupt_samples_skipped"] for task in corrupt} == corrupt
    # Each rank's loader state in the final checkpoint: same step, same samples per task.
    client = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "client_state"
    loaders = [json.loads((client / f"rank_{rank:05d}.json").read_text())["loader"] for rank in (0, 1)]
    assert loaders[0]["step"] == loaders[1]["step"] == STEPS
    for task, batch_size in (("imagenet", 10), ("coco", 3), ("ade20k", 3)):
        consumed = [loader["tasks"][task]["samples_consumed"] for loader in loaders]
        assert consumed == [STEPS * batch_size] * 2, task
