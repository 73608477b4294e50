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

from moevit.data.synth import real_spec, synthetic_data_is_complete, write_synthetic_datasets
from moevit.data.synth.ade20k import write_ade20k
from moevit.data.synth.ade20k_real import CLASSES as ADE20K_REAL_CLASSES
from moevit.data.synth.ade20k_real import class_attributes as ade20k_class_attributes
from moevit.data.synth.ade20k_real import render_real_pair, write_ade20k_real
from moevit.data.synth.coco import write_coco
from moevit.data.synth.coco_real import uncompressed_rle, write_coco_real
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


# ---------------------------------------------------------------- the true-resolution `real` preset

REAL = SIZES["real"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One `real` write with seed 0 and its summary. Its wall time and size on disk are printed (shown
    with `pytest -s`), not asserted: they measure the machine as much as the code."""
    root = tmp_path_factory.mktemp("synth_real")
    start = time.perf_counter()
    summary = write_synthetic_datasets(root, seed=0, size="real")
    seconds = time.perf_counter() - start
    on_disk = {
        name: sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file()) for name in summary
    }
    print(
        f"\nsynthetic 'real' preset: written in {seconds:.1f} s wall; on disk "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in on_disk.items())
        + f", total {sum(on_disk.values()) / 2**20:.1f} MiB"
    )
    return root, summary


def _image_sizes(folder: Path, pattern: str) -> list[tuple[int, int]]:
    """(height, width) of every image under `folder` matching `pattern`."""
    sizes = []
    for path in sorted(folder.glob(pattern)):
        with Image.open(path) as image:
            sizes.append(image.size[::-1])
    return sizes


def test_real_preset_writes_images_at_the_real_datasets_sizes(real):
    root, summary = real
    assert summary == {
        "imagenet": {"num_classes": 10, "images": {s: n * 10 for s, n in REAL.imagenet_per_class.items()}},
        "coco": {"num_classes": 80, "images": REAL.coco},
        "ade20k": {"num_classes": 150, "images": REAL.ade20k},
    }
    imagenet = _image_sizes(root / "imagenet", "*/*/*.JPEG")
    coco = _image_sizes(root / "coco", "*2017/*.jpg")
    ade20k = _image_sizes(root / "ade20k" / "ADEChallengeData2016" / "images", "*/*.jpg")
    for sizes, choices, typical in (
        (imagenet, real_spec.IMAGENET_SIZES, (375, 500)),
        (coco, real_spec.COCO_SIZES, (480, 640)),
        (ade20k, real_spec.ADE20K_SIZES, (512, 683)),
    ):
        assert set(sizes) <= set(choices)
        assert typical in sizes and len(set(sizes)) >= 4, "sizes and aspect ratios vary, as in the real sets"
        assert any(height > width for height, width in sizes), "some images are portrait"
    assert max(max(s) for s in imagenet) == 500 and max(max(s) for s in coco) == 640
    assert min(min(s) for s in ade20k) >= 384


def test_real_preset_marker_is_complete_for_real_only(real):
    root, _ = real
    assert synthetic_data_is_complete(root, seed=0, size="real")
    assert not synthetic_data_is_complete(root, seed=0, size="tiny")
    assert not synthetic_data_is_complete(root, seed=1, size="real")


def test_real_preset_is_deterministic(real, tmp_path):
    """Each file is a function of (seed, its key): rewriting the val splits alone gives the same bytes."""
    root, _ = real
    write_imagenet(tmp_path / "imagenet", 0, {"val": REAL.imagenet_per_class["val"]}, true_resolution=True)
    write_coco_real(tmp_path / "coco", 0, {"val2017": REAL.coco["val2017"]})
    write_ade20k_real(tmp_path / "ade20k", 0, {"validation": REAL.ade20k["validation"]})
    again = {
        name: digest
        for name, digest in _tree_digest(tmp_path).items()
        if "val" in name and not name.endswith("objectInfo150.txt")
    }
    assert len(again) == 20 + 8 + 1 + 2 * 8  # images, the val JSON, ADE20K images and label maps
    first = _tree_digest(root)
    assert all(first[name] == digest for name, digest in again.items())


def test_real_imagenet_has_the_odd_files_of_real_imagenet(real):
    root, _ = real
    formats = Counter()
    for path in (root / "imagenet").glob("*/*/*.JPEG"):
        with Image.open(path) as image:
            formats[(image.format, image.mode)] += 1
    assert formats[("PNG", "RGB")] == 1 and formats[("JPEG", "CMYK")] == 1
    assert set(formats) <= {("PNG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "RGB"), ("JPEG", "L")}


def test_real_coco_has_gapped_ids_crowds_and_empty_images(real):
    root, _ = real
    for split in REAL.coco:
        coco = _load_coco(root / "coco" / "annotations" / f"instances_{split}.json")
        category_ids = sorted(coco.getCatIds())
        assert len(category_ids) == 80 and category_ids[-1] == 90
        assert set(range(1, 91)) - set(category_ids) == set(real_spec.COCO_ID_GAPS)
        used = {ann["category_id"] for ann in coco.anns.values()}
        assert used <= set(real_spec.COCO_USED_CATEGORIES.values()) and len(used) >= 5

        per_image = Counter(ann["image_id"] for ann in coco.anns.values())
        assert any(image_id not in per_image for image_id in coco.imgs), "an image without annotations"
        assert max(per_image.values()) <= 21 and max(per_image.values()) >= 12

        crowds = [ann for ann in coco.anns.values() if ann["iscrowd"]]
        assert crowds
        for ann in crowds:
            record = coco.imgs[ann["image_id"]]
            rle = ann["segmentation"]
            assert isinstance(rle["counts"], list) and rle["size"] == [record["height"], record["width"]]
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"] > 0
            rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert ann["bbox"] == [columns[0], rows[0], columns[-1] + 1 - columns[0], rows[-1] + 1 - rows[0]]
        for ann in coco.anns.values():
            record = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= record["width"] and y + h <= record["height"]


def test_real_coco_ground_truth_scores_ap_one_with_crowds_ignored(real):
    """COCOeval reads the crowd regions as crowds: a detection on one is ignored, not a false positive."""
    root, _ = real
    coco = _load_coco(root / "coco" / "annotations" / "instances_val2017.json")
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.anns.values()
    ]
    assert any(a["iscrowd"] for a in coco.anns.values())
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    assert all(stat > 0 for stat in evaluation.stats[3:6]), "small, medium and large objects all occur"


def test_uncompressed_rle_decodes_back_through_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for first_pixel in (False, True):
        mask = rng.random((7, 5)) < 0.4
        mask[0, 0] = first_pixel
        rle = uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size
        decoded = mask_util.decode(mask_util.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask)


def test_real_ade20k_masks_hold_other_and_the_150_class_range(real):
    root, _ = real
    dataset = root / "ade20k" / "ADEChallengeData2016"
    for split in REAL.ade20k:
        seen = set()
        for label_path in sorted((dataset / "annotations" / split).glob("*.png")):
            image_path = dataset / "images" / split / f"{label_path.stem}.jpg"
            with Image.open(label_path) as label, Image.open(image_path) as image:
                assert label.mode == "L" and label.size == image.size
                seen |= set(np.unique(np.asarray(label)).tolist())
        assert 0 in seen and max(seen) <= 150
        assert min(seen - {0}) <= 30 and max(seen) >= 120, "labels spread over the 150 classes"
    info = (dataset / "objectInfo150.txt").read_text().splitlines()
    assert len(info) == 151 and [row.split("\t")[-1] for row in info[1:]] == list(ADE20K_REAL_CLASSES)


def test_real_ade20k_class_is_visible_in_its_region():
    """A region's hue family and lightness show in its pixels (its texture is the third attribute)."""
    pixels, labels = render_real_pair(sample_rng(0, "test-ade20k-real"))
    checked = 0
    for label in np.unique(labels):
        if label == 0 or (labels == label).sum() < 2000:
            continue
        texture_name, family, lightness = ade20k_class_attributes(int(label))
        region = pixels[labels == label].astype(np.float64) / 255
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in region[::7]])
        saturated = hsv[hsv[:, 1] > 0.45]
        assert len(saturated) > 0.2 * len(hsv), ADE20K_REAL_CLASSES[label - 1]
        offset = (np.median(saturated[:, 0]) * 360 - HUE_FAMILIES[family] + 180) % 360 - 180
        assert abs(offset) < HUE_JITTER_DEG["imagenet"] + 5, (label, texture_name)
        low, high = real_spec.ADE20K_LIGHTNESS[lightness]
        assert low - 0.08 < np.median(saturated[:, 2]) < high + 0.08, (label, lightness)
        checked += 1
    assert checked >= 3


def test_real_readers_read_every_split(real):
    readers = pytest.importorskip("moevit.data")
    root, summary = real
    for split in ("train", "val"):
        imagenet = readers.ImageNetFolder(root / "imagenet", split)
        assert len(imagenet) == summary["imagenet"]["images"][split]
        samples = [imagenet[i] for i in range(len(imagenet))]
        assert {s["label"] for s in samples} == set(range(10))
        assert all(s["image"].shape[0] == 3 and max(s["image"].shape[1:]) == 500 for s in samples)

        coco = readers.CocoDetection(root / "coco", split)
        assert len(coco) == summary["coco"]["images"][f"{split}2017"] and len(coco.classes) == 80
        assert coco.num_crowd_boxes > 0 and coco.label_to_cat_id[-1] == 90
        boxes, empty = 0, 0
        for i in range(len(coco)):
            sample = coco[i]
            record = coco.coco.imgs[sample["image_id"]]
            assert tuple(sample["image"].shape) == (3, record["height"], record["width"])
            assert all(0 <= label < 80 for label in sample["labels"].tolist())
            boxes += len(sample["boxes"])
            empty += len(sample["boxes"]) == 0
        assert boxes == len(coco.coco.anns) - coco.num_crowd_boxes and empty >= 1

        ade20k = readers.ADE20K(root / "ade20k", split)
        assert len(ade20k) == summary["ade20k"]["images"]["training" if split == "train" else "validation"]
        values = set()
        for i in range(len(ade20k)):
            sample = ade20k[i]
            assert tuple(sample["mask"].shape) == tuple(sample["image"].shape[1:])
            values |= set(sample["mask"].unique().tolist())
        assert 255 in values and values - {255} <= set(range(150)), "0 read as ignore, 1..150 as 0..149"


def test_cli_offers_the_real_preset():
    from moevit.cli import build_parser

    args = build_parser().parse_args(["data", "synth", "--out", "DIR", "--size", "real"])
    assert args.size == "real"
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(["data", "synth", "--out", "DIR", "--size", "huge"])
