"""The synthetic dataset generator: determinism, exact ImageNet / COCO / ADE20K formats, the completeness
marker, drawing primitives, and reading the output back through moevit's readers."""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from moevit.data.synth import synthetic_data_is_complete, write_synthetic_datasets
from moevit.data.synth.ade20k import write_ade20k
from moevit.data.synth.coco import write_coco
from moevit.data.synth.imagenet import render_classification_image, write_imagenet
from moevit.data.synth.shapes import SHAPES, TEXTURES, polygon_area, rasterize, shape_polygon, texture
from moevit.data.synth.spec import (
    ADE20K_CLASSES,
    ADE20K_IMAGE_SIZE,
    COCO_CATEGORY_IDS,
    COCO_IMAGE_SIZE,
    HUE_FAMILIES,
    HUE_JITTER_DEG,
    IMAGENET_CLASSES,
    IMAGENET_IMAGE_SIZE,
    SIZES,
    sample_rng,
)

TINY = SIZES["tiny"]
# "tiny" takes about 1.3 CPU seconds. CPU time rather than wall time: a machine shared with other jobs
# stretches the wall clock, not the work.
TINY_WRITE_LIMIT_CPU_S = 5.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic write with seed 0, its summary and the CPU seconds it took."""
    root = tmp_path_factory.mktemp("synth")
    start = time.process_time()
    summary = write_synthetic_datasets(root, seed=0, size="tiny")
    return root, summary, time.process_time() - start


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ---------------------------------------------------------------- determinism and the marker


def test_tiny_writes_in_seconds(tiny):
    assert tiny[2] < TINY_WRITE_LIMIT_CPU_S


def test_same_seed_gives_identical_files(tiny, tmp_path):
    root, _, _ = tiny
    write_synthetic_datasets(tmp_path, seed=0, size="tiny")
    assert _tree_digest(tmp_path) == _tree_digest(root)


def test_different_seed_gives_different_images(tmp_path):
    for seed in (0, 1):
        write_imagenet(tmp_path / str(seed) / "imagenet", seed, {"val": 1})
        write_coco(tmp_path / str(seed) / "coco", seed, {"val2017": 2})
        write_ade20k(tmp_path / str(seed) / "ade20k", seed, {"validation": 2})
    first, second = _tree_digest(tmp_path / "0"), _tree_digest(tmp_path / "1")
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith((".JPEG", ".jpg", ".png"))]
    assert len(images) == 10 + 2 + 4
    assert all(first[name] != second[name] for name in images)


def test_each_image_depends_only_on_its_own_index(tmp_path):
    """A smaller write is a prefix of a larger one: no shared random stream between samples."""
    write_coco(tmp_path / "three", 0, {"val2017": 3})
    write_coco(tmp_path / "five", 0, {"val2017": 5})
    three, five = _tree_digest(tmp_path / "three"), _tree_digest(tmp_path / "five")
    images_of_three = {name: digest for name, digest in three.items() if name.endswith(".jpg")}
    assert len(images_of_three) == 3
    assert all(five[name] == digest for name, digest in images_of_three.items())


def test_summary_matches_the_size_preset(tiny):
    _, summary, _ = tiny
    assert summary == {
        "imagenet": {"num_classes": 10, "images": {s: n * 10 for s, n in TINY.imagenet_per_class.items()}},
        "coco": {"num_classes": len(COCO_CATEGORY_IDS), "images": TINY.coco},
        "ade20k": {"num_classes": len(ADE20K_CLASSES), "images": TINY.ade20k},
    }


def test_marker_says_complete_only_for_the_written_seed_and_size(tiny):
    root, _, _ = tiny
    assert synthetic_data_is_complete(root, seed=0, size="tiny")
    assert not synthetic_data_is_complete(root, seed=1, size="tiny")
    assert not synthetic_data_is_complete(root, seed=0, size="small")
    assert not synthetic_data_is_complete(root.parent / "nothing-here", seed=0, size="tiny")


def test_marker_notices_a_deleted_file_and_an_unfinished_write(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny[0], out)
    marker_path = out / "_synth.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "complete": False}))
    assert not synthetic_data_is_complete(out, seed=0, size="tiny")
    marker_path.write_text(json.dumps(marker))
    assert synthetic_data_is_complete(out, seed=0, size="tiny")
    next((out / "ade20k").rglob("*.png")).unlink()
    assert not synthetic_data_is_complete(out, seed=0, size="tiny")


def test_rewrite_removes_stale_files_but_foreign_data_is_refused(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny[0], out)
    stale = out / "imagenet" / "train" / "n00000001" / "stale.JPEG"
    stale.write_bytes(b"left over from an earlier write")
    write_synthetic_datasets(out, seed=0, size="tiny")
    assert not stale.exists()
    assert synthetic_data_is_complete(out, seed=0, size="tiny")

    foreign = tmp_path / "real"
    (foreign / "coco" / "train2017").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="_synth.json"):
        write_synthetic_datasets(foreign)
    assert (foreign / "coco" / "train2017").is_dir()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        write_synthetic_datasets(tmp_path, size="huge")
    with pytest.raises(ValueError, match="non-negative"):
        write_synthetic_datasets(tmp_path, seed=-1)


# ---------------------------------------------------------------- ImageNet layout


def test_imagenet_has_wnid_folders_of_decodable_jpegs(tiny):
    root, _, _ = tiny
    for split, per_class in TINY.imagenet_per_class.items():
        folders = sorted((root / "imagenet" / split).iterdir())
        assert [f.name for f in folders] == [f"n{i:08d}" for i in range(1, len(IMAGENET_CLASSES) + 1)]
        for folder in folders:
            files = sorted(folder.iterdir())
            assert len(files) == per_class and all(f.suffix == ".JPEG" for f in files)
            for file in files:
                with Image.open(file) as image:
                    assert image.format == "JPEG" and image.mode in ("RGB", "L")
                    assert image.size == IMAGENET_IMAGE_SIZE[::-1]
                    image.load()
    names = (root / "imagenet" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert names[0] == "n00000001 red"


# ---------------------------------------------------------------- COCO layout


def test_coco_json_is_a_valid_instances_file(tiny):
    root, _, _ = tiny
    for split, count in TINY.coco.items():
        coco = _load_coco(root / "coco" / "annotations" / f"instances_{split}.json")
        category_ids = sorted(coco.getCatIds())
        assert category_ids == sorted(COCO_CATEGORY_IDS.values())
        assert category_ids != list(range(1, len(category_ids) + 1)), "ids must have gaps like COCO's"
        assert len(coco.imgs) == count and len(coco.anns) > count
        image_ids = sorted(coco.imgs)
        assert image_ids != list(range(1, count + 1)), "image ids must not be list positions"
        for record in coco.imgs.values():
            with Image.open(root / "coco" / split / record["file_name"]) as image:
                assert image.format == "JPEG" and image.size == (record["width"], record["height"])
        for ann in coco.anns.values():
            record = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= record["width"] and y + h <= record["height"]
            assert min(w, h) >= 12, "objects must stay learnable at patch size 8"
            polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            assert np.allclose(polygon.min(axis=0), [x, y], atol=0.01)
            assert np.allclose(polygon.max(axis=0), [x + w, y + h], atol=0.01)
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
            assert ann["category_id"] in category_ids


def test_coco_ids_are_unique_across_splits(tiny):
    root, _, _ = tiny
    files = [
        json.loads((root / "coco" / "annotations" / f"instances_{s}.json").read_text()) for s in TINY.coco
    ]
    for key in ("images", "annotations"):
        ids = [item["id"] for data in files for item in data[key]]
        assert len(ids) == len(set(ids))


def test_ground_truth_scores_ap_one_in_cocoeval(tiny):
    """Boxes, areas and categories agree with each other the way COCOeval needs them to."""
    root, _, _ = tiny
    coco = _load_coco(root / "coco" / "annotations" / "instances_val2017.json")
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.anns.values()
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- ADE20K layout


def test_ade20k_label_pngs_match_their_images(tiny):
    root, _, _ = tiny
    dataset = root / "ade20k" / "ADEChallengeData2016"
    for split, count in TINY.ade20k.items():
        images = sorted((dataset / "images" / split).iterdir())
        labels = sorted((dataset / "annotations" / split).iterdir())
        assert len(images) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        assert all(p.suffix == ".jpg" for p in images) and all(p.suffix == ".png" for p in labels)
        seen = Counter()
        for image_path, label_path in zip(images, labels):
            with Image.open(image_path) as image, Image.open(label_path) as label:
                assert image.format == "JPEG" and label.format == "PNG" and label.mode == "L"
                assert image.size == label.size == ADE20K_IMAGE_SIZE[::-1]
                values = np.asarray(label)
            assert values.dtype == np.uint8 and values.max() <= len(ADE20K_CLASSES)
            seen.update(np.unique(values).tolist())
        assert set(seen) >= set(range(1, len(ADE20K_CLASSES) + 1)), "every class appears in every split"
    info = (dataset / "objectInfo150.txt").read_text().splitlines()
    assert info[0].split("\t") == ["Idx", "Ratio", "Train", "Val", "Name"]
    assert [row.split("\t")[-1] for row in info[1:]] == list(ADE20K_CLASSES)


# ---------------------------------------------------------------- vocabulary and drawing primitives


def test_each_task_reads_its_own_vocabulary():
    assert set(IMAGENET_CLASSES) == set(HUE_FAMILIES)
    assert set(COCO_CATEGORY_IDS) <= set(HUE_FAMILIES) and set(ADE20K_CLASSES) <= set(TEXTURES)
    # labels are unambiguous: a class's hue spread stays inside half the spacing to its neighbours
    for hues, jitter in (
        ([HUE_FAMILIES[c] for c in IMAGENET_CLASSES], HUE_JITTER_DEG["imagenet"]),
        ([HUE_FAMILIES[c] for c in COCO_CATEGORY_IDS], HUE_JITTER_DEG["coco"]),
    ):
        spacing = min((b - a) % 360 for a in hues for b in hues if a != b)
        assert jitter < spacing / 2


def test_classification_images_show_their_hue():
    for class_index, family in enumerate(IMAGENET_CLASSES):
        image = render_classification_image(
            sample_rng(0, "test", class_index), HUE_FAMILIES[family], (64, 64)
        )
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels.reshape(-1, 3)])
        saturated = hsv[hsv[:, 1] > 0.45]  # the object; the background is near grey
        assert len(saturated) > 0.1 * len(hsv)
        offset = (np.median(saturated[:, 0]) * 360 - HUE_FAMILIES[family] + 180) % 360 - 180
        assert abs(offset) < HUE_JITTER_DEG["imagenet"] + 5, family


@pytest.mark.parametrize("shape", SHAPES)
def test_rasterized_coverage_matches_polygon_area(shape):
    polygon = shape_polygon(shape, size=30.0, angle_deg=10.0, center_xy=(32.0, 32.0))
    perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum()
    # PIL fills the boundary's fine pixels too: up to 1/4 px (one 4x-supersampled pixel) along the outline.
    assert abs(rasterize(polygon, 64, 64).sum() - polygon_area(polygon)) <= perimeter / 4


def test_textures_have_their_orientation():
    rng = np.random.default_rng(0)
    colors = [np.zeros(3), np.full(3, 255.0)]
    patterns = {name: texture(name, 32, 32, colors, rng)[..., 0] for name in TEXTURES}
    assert np.ptp(patterns["solid"]) == 0
    assert np.ptp(patterns["hstripes"], axis=1).max() == 0 and np.ptp(patterns["hstripes"]) > 0
    assert np.ptp(patterns["vstripes"], axis=0).max() == 0 and np.ptp(patterns["vstripes"]) > 0
    for name in ("checker", "dots"):
        assert np.ptp(patterns[name], axis=0).max() > 0 and np.ptp(patterns[name], axis=1).max() > 0


# ---------------------------------------------------------------- read back through moevit's readers


def test_readers_load_every_split(tiny):
    readers = pytest.importorskip("moevit.data")
    root, summary, _ = tiny
    for split in ("train", "val"):
        imagenet = readers.ImageNetFolder(root / "imagenet", split)
        assert len(imagenet) == summary["imagenet"]["images"][split]
        assert imagenet.classes == [f"n{i:08d}" for i in range(1, len(IMAGENET_CLASSES) + 1)]
        labels = {imagenet[i]["label"] for i in range(len(imagenet))}
        assert labels == set(range(len(IMAGENET_CLASSES)))
        assert all(imagenet[i]["image"].shape == (3, *IMAGENET_IMAGE_SIZE) for i in range(len(imagenet)))

        coco = readers.CocoDetection(root / "coco", split)
        assert len(coco) == summary["coco"]["images"][f"{split}2017"]
        boxes = 0
        for i in range(len(coco)):
            sample = coco[i]
            assert sample["image"].shape == (3, *COCO_IMAGE_SIZE)
            assert all(0 <= label < len(COCO_CATEGORY_IDS) for label in sample["labels"].tolist())
            boxes += len(sample["boxes"])
        assert boxes == len(coco.coco.anns)

        ade20k = readers.ADE20K(root / "ade20k", split)
        assert len(ade20k) == summary["ade20k"]["images"]["training" if split == "train" else "validation"]
        for i in range(len(ade20k)):
            mask = ade20k[i]["mask"]
            assert mask.shape == ADE20K_IMAGE_SIZE
            values = set(mask.unique().tolist())
            assert values <= set(range(len(ADE20K_CLASSES))) | {255}
