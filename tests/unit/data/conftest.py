"""Writers of tiny datasets in the exact on-disk formats of ImageNet, COCO 2017 and ADE20K.

Each ``write_*`` function builds a dataset under a folder and returns a small record of what it wrote
(expected classes, labels, boxes), so reader tests and shard tests can check the same facts. The
fixtures at the bottom call them on ``tmp_path``. Everything is generated here; nothing is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def solid_image(width: int, height: int, color: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), color)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_truncated_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    """Writes a JPEG cut in half, as left behind by an interrupted copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(width, height, seed=0).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------- ImageNet


@dataclass(frozen=True)
class ImageNetFixture:
    """What ``write_imagenet`` wrote. Keys are ``{split}/{wnid}/{stem}``; colors are the RGB each decodes to."""

    root: Path
    classes: list[str]
    train_keys: list[str]
    val_keys: list[str]
    cmyk_key: str
    gray_key: str
    png_named_jpeg_key: str
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)


IMAGENET_SIZE = (24, 16)  # width, height: not square, so a swapped H/W shows up


def write_imagenet(root: Path) -> ImageNetFixture:
    """Three classes; train holds a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG, a lowercase .jpeg
    and a stray text file that must be ignored; val holds one RGB JPEG per class."""
    width, height = IMAGENET_SIZE
    classes = ["n01440764", "n01443537", "n01484850"]
    red, green, blue, gray = (220, 20, 20), (20, 200, 20), (20, 20, 220), (128, 128, 128)
    train_files = {
        # key -> (file name suffix, PIL image, save format, decoded color)
        f"train/{classes[0]}/{classes[0]}_1": (".JPEG", solid_image(width, height, red), "JPEG", red),
        f"train/{classes[0]}/{classes[0]}_2": (
            ".JPEG",
            solid_image(width, height, (0, 255, 255, 0), mode="CMYK"),
            "JPEG",
            (255, 0, 0),
        ),
        f"train/{classes[1]}/{classes[1]}_1": (".JPEG", solid_image(width, height, green), "JPEG", green),
        f"train/{classes[1]}/{classes[1]}_2": (
            ".JPEG",
            solid_image(width, height, 128, mode="L"),
            "JPEG",
            gray,
        ),
        f"train/{classes[2]}/{classes[2]}_1": (".jpeg", solid_image(width, height, blue), "JPEG", blue),
        f"train/{classes[2]}/{classes[2]}_2": (".JPEG", solid_image(width, height, blue), "PNG", blue),
    }
    val_files = {
        f"val/{wnid}/ILSVRC2012_val_0000000{index + 1}": (
            ".JPEG",
            solid_image(width, height, color),
            "JPEG",
            color,
        )
        for index, (wnid, color) in enumerate(zip(classes, (red, green, blue)))
    }
    colors = {}
    for key, (suffix, image, image_format, color) in {**train_files, **val_files}.items():
        path = root / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=image_format)
        colors[key] = color
    (root / "train" / classes[2] / "notes.txt").write_text("not an image\n")
    return ImageNetFixture(
        root=root,
        classes=classes,
        train_keys=sorted(train_files),
        val_keys=sorted(val_files),
        cmyk_key=f"train/{classes[0]}/{classes[0]}_2",
        gray_key=f"train/{classes[1]}/{classes[1]}_2",
        png_named_jpeg_key=f"train/{classes[2]}/{classes[2]}_2",
        colors=colors,
    )


# ---------------------------------------------------------------- COCO


@dataclass(frozen=True)
class CocoFixture:
    """What ``write_coco`` wrote; ``expected_targets`` maps image id -> (XYXY boxes, labels)."""

    root: Path
    split: str
    cat_ids: list[int]
    class_names: list[str]
    image_ids: list[int]
    annotated_image_id: int
    empty_image_id: int
    missing_file_image_id: int
    crowd_ann_id: int
    num_crowd: int
    num_degenerate: int
    expected_targets: dict[int, tuple[list[list[float]], list[int]]]


COCO_SIZE = (40, 30)  # width, height


def _coco_ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
    x, y, w, h = bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": float(w * h),
        "iscrowd": iscrowd,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def write_coco(root: Path, split: str = "val") -> CocoFixture:
    """Categories 1, 3, 90 (non-contiguous, as in COCO); image 397133 holds a normal box, a crowd box,
    a box partly outside (clipped), a box under 1 px wide and a box wholly outside (both degenerate);
    image 37777 has no annotations; image 252219 is annotated but its file is missing."""
    width, height = COCO_SIZE
    annotated, empty, missing = 397133, 37777, 252219
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    ]
    images = [
        {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height}
        for image_id in (annotated, empty, missing)
    ]
    annotations = [
        _coco_ann(101, annotated, 3, [5.0, 5.0, 10.0, 8.0]),
        _coco_ann(102, annotated, 1, [0.0, 0.0, 40.0, 30.0], iscrowd=1),
        _coco_ann(103, annotated, 90, [30.0, 20.0, 20.0, 20.0]),  # clipped to [30, 20, 40, 30]
        _coco_ann(104, annotated, 1, [10.0, 10.0, 0.5, 5.0]),  # 0.5 px wide: degenerate
        _coco_ann(105, annotated, 1, [50.0, 40.0, 5.0, 5.0]),  # wholly outside: degenerate
        _coco_ann(106, annotated, 1, [-5.0, -5.0, 10.0, 12.0]),  # clipped to [0, 0, 5, 7]
        _coco_ann(107, missing, 3, [1.0, 1.0, 5.0, 5.0]),
    ]
    instances = {
        "info": {"description": "moevit test fixture"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    for seed, image_id in enumerate((annotated, empty)):
        noise_image(width, height, seed).save(image_dir / f"{image_id:012d}.jpg", format="JPEG")
    return CocoFixture(
        root=root,
        split=split,
        cat_ids=[1, 3, 90],
        class_names=["person", "car", "toothbrush"],
        image_ids=sorted((annotated, empty, missing)),
        annotated_image_id=annotated,
        empty_image_id=empty,
        missing_file_image_id=missing,
        crowd_ann_id=102,
        num_crowd=1,
        num_degenerate=2,
        expected_targets={
            annotated: ([[5.0, 5.0, 15.0, 13.0], [30.0, 20.0, 40.0, 30.0], [0.0, 0.0, 5.0, 7.0]], [1, 2, 0]),
            empty: ([], []),
        },
    )


# ---------------------------------------------------------------- ADE20K


@dataclass(frozen=True)
class Ade20kFixture:
    """What ``write_ade20k`` wrote; ``stored_mask`` is the label PNG content shared by every image."""

    root: Path
    data_root: Path
    train_names: list[str]
    val_names: list[str]
    stored_mask: np.ndarray


ADE20K_SIZE = (20, 12)  # width, height


def ade20k_stored_mask(width: int, height: int) -> np.ndarray:
    """Label map as stored in ADE20K PNGs: left third 0 ("other"), middle third 1, right third 150."""
    stored = np.zeros((height, width), dtype=np.uint8)
    stored[:, width // 3 : 2 * width // 3] = 1
    stored[:, 2 * width // 3 :] = 150
    return stored


def write_ade20k(root: Path) -> Ade20kFixture:
    """``root/ADEChallengeData2016`` with two training and one validation image/label pair."""
    width, height = ADE20K_SIZE
    data_root = root / "ADEChallengeData2016"
    stored = ade20k_stored_mask(width, height)
    names = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}
    for seed, (folder, stems) in enumerate(names.items()):
        (data_root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (data_root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for offset, stem in enumerate(stems):
            noise_image(width, height, seed * 10 + offset).save(data_root / "images" / folder / f"{stem}.jpg")
            Image.fromarray(stored).save(data_root / "annotations" / folder / f"{stem}.png")
    return Ade20kFixture(
        root=root,
        data_root=data_root,
        train_names=names["training"],
        val_names=names["validation"],
        stored_mask=stored,
    )


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def imagenet_fixture(tmp_path: Path) -> ImageNetFixture:
    return write_imagenet(tmp_path / "imagenet")


@pytest.fixture
def coco_fixture(tmp_path: Path) -> CocoFixture:
    return write_coco(tmp_path / "coco")


@pytest.fixture
def ade20k_fixture(tmp_path: Path) -> Ade20kFixture:
    return write_ade20k(tmp_path / "ade20k")


@pytest.fixture
def dataset_writers() -> SimpleNamespace:
    """The writer functions, for tests that build variants (extra files, other roots) themselves."""
    return SimpleNamespace(
        imagenet=write_imagenet, coco=write_coco, ade20k=write_ade20k, truncated_jpeg=write_truncated_jpeg
    )
