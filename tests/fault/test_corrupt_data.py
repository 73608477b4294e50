"""5 % corrupt samples spread over the three datasets (issue 10, issue 22): `moevit train --nproc 2` (EP=2)
completes, metrics.jsonl reports every corrupt sample once per task, and every rank drew exactly the
batches the promise describes: each corrupt sample replaced by the next readable one.

That last part is checked against a control run on an undamaged copy of the data in which every damaged
sample was overwritten with its next neighbour (image bytes, and its mask or its COCO annotations). Both
runs seed each sample's augmentation by its stream position, so if every rank drew the same samples at
the same positions in both, every logged loss and every tensor of the final checkpoint agree bit for
bit. A rank that dropped a sample, drew an extra batch or substituted anything else would differ.

Batch sizes are chosen so that the run is exactly one epoch of every task's train split (8 steps:
ImageNet 160 = 8 x 2 ranks x 10, COCO and ADE20K 48 = 8 x 2 x 3). Corrupt files are never adjacent in
a reader's (sorted) order, so each is met exactly once.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fault_helpers import comparable, final_weights, read_records, run_moevit, write_config

from moevit.data.ade20k import ADE20K
from moevit.data.coco import CocoDetection
from moevit.data.imagenet import ImageNetFolder

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
COUNTER = "corrupt_samples_skipped"


def corrupt_every(paths, every: int, damage) -> list:
    chosen = sorted(paths)[every // 2 :: every]
    for path in chosen:
        damage(path)
    return chosen


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def garbage(path) -> None:
    path.write_bytes(b"\x00not an image\xff" * 20)


def copy_file(source, target) -> None:
    target.write_bytes(source.read_bytes())


def replace_imagenet(root, damaged) -> None:
    """In `root` (undamaged), each damaged image becomes its next neighbour in the reader's order."""
    reader = ImageNetFolder(root, "train")
    order = [path for path, _ in reader.samples]
    for path in damaged:
        index = order.index(str(path.relative_to(path.parents[2])))
        (here, label), (there, next_label) = reader.samples[index], reader.samples[index + 1]
        assert label == next_label, "the neighbour must share the class folder's label"
        copy_file(root / there, root / here)


def replace_ade20k(root, damaged_masks) -> None:
    reader = ADE20K(root, "train")
    for mask in damaged_masks:
        index = reader.image_names.index(f"{mask.stem}.jpg")
        here, there = (reader.image_names[i].removesuffix(".jpg") for i in (index, index + 1))
        copy_file(reader.image_dir / f"{there}.jpg", reader.image_dir / f"{here}.jpg")
        copy_file(reader.annotation_dir / f"{there}.png", reader.annotation_dir / f"{here}.png")


def replace_coco(root, damaged) -> None:
    """The image bytes, size and annotations of the neighbour move onto the damaged image's id."""
    reader = CocoDetection(root, "train")
    names = {reader.coco.imgs[i]["file_name"]: i for i in reader.image_ids}
    data = json.loads(reader.annotation_file.read_text())
    images = {record["id"]: record for record in data["images"]}
    next_id = max(ann["id"] for ann in data["annotations"]) + 1
    for path in damaged:
        here = names[path.name]
        there = reader.image_ids[reader.image_ids.index(here) + 1]
        copy_file(reader.image_dir / images[there]["file_name"], path)
        images[here].update(width=images[there]["width"], height=images[there]["height"])
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] != here]
        for ann in [ann for ann in data["annotations"] if ann["image_id"] == there]:
            data["annotations"].append({**ann, "id": next_id, "image_id": here})
            next_id += 1
    reader.annotation_file.write_text(json.dumps(data))


def train(tmp_path, tiny_config, root, name):
    run_dir = tmp_path / name
    config = tiny_config(
        root,
        run_dir,
        batch_sizes={"imagenet": 10, "coco": 3, "ade20k": 3},
        tasks={"coco": {"head_options": {"out_channels": 32}}, "ade20k": {"head_options": {"channels": 32}}},
        train={"steps": STEPS, "eval_batches": 1, "checkpoint_every": 0},
        parallel={"ep_size": 2},
    )
    done = run_moevit("train", str(write_config(tmp_path / f"{name}.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir


@pytest.mark.timeout(400)
def test_training_replaces_corrupt_samples_by_their_neighbours_on_every_rank(
    synth_root, tmp_path, tiny_config
):
    root, control = tmp_path / "synth", tmp_path / "control"
    shutil.copytree(synth_root, root)
    shutil.copytree(synth_root, control)
    annotations = lambda base: base / "ade20k" / "ADEChallengeData2016" / "annotations" / "training"  # noqa: E731
    damaged = {
        "imagenet": corrupt_every((root / "imagenet" / "train").glob("*/*.JPEG"), 20, truncate),  # 8 of 160
        "coco": corrupt_every((root / "coco" / "train2017").glob("*.jpg"), 24, garbage),  # 2 of 48
        "ade20k": corrupt_every(annotations(root).glob("*.png"), 16, truncate),  # 3 of 48
    }
    counts = {task: len(paths) for task, paths in damaged.items()}
    assert sum(counts.values()) / (160 + 48 + 48) >= 0.05
    replace_imagenet(control / "imagenet", [control / p.relative_to(root) for p in damaged["imagenet"]])
    replace_coco(control / "coco", [control / p.relative_to(root) for p in damaged["coco"]])
    replace_ade20k(control / "ade20k", [control / p.relative_to(root) for p in damaged["ade20k"]])

    run_dir = train(tmp_path, tiny_config, root, "run")
    control_dir = train(tmp_path, tiny_config, control, "control_run")

    records, control_records = read_records(run_dir), read_records(control_dir)
    last = {r["task"]: r for r in records if r["split"] == "train" and r["step"] == STEPS}
    assert {task: last[task][COUNTER] for task in counts} == counts
    assert all(r.get(COUNTER, 0) == 0 for r in control_records)

    def without_counter(rows):
        return [{k: v for k, v in row.items() if k != COUNTER} for row in comparable(rows)]

    assert len(records) == len(control_records)
    assert without_counter(records) == without_counter(control_records)
    weights, control_weights = final_weights(run_dir, STEPS), final_weights(control_dir, STEPS)
    assert weights.keys() == control_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, control_weights[key]), key
