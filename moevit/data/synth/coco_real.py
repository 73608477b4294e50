"""The `real` preset's detection images: COCO 2017's sizes, 80 gapped category ids, up to 20 objects of
small to large size, crowd regions and images without objects (numbers and why: real_spec.py).

Same layout and JSON as the toy presets (synth/coco.py). Objects are separated shapes with random
outline and texture whose category is their hue family; a crowd is a cluster of small overlapping
shapes of one hue family, annotated once as COCO annotates crowds: ``iscrowd`` 1, ``segmentation`` an
uncompressed RLE ``{"counts": [...], "size": [h, w]}`` of the cluster's pixels, ``area`` its pixel count
and ``bbox`` its pixel extent. COCOeval ignores detections that fall on it; training leaves it out.
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from moevit.data.synth import real_spec
from moevit.data.synth.coco import annotation_fields, place_apart, write_coco_split
from moevit.data.synth.shapes import (
    SHAPES,
    TEXTURES,
    composite,
    hue_shades,
    neutral_color,
    paint_polygon,
    shape_polygon,
    smooth_background,
    texture,
    to_uint8,
)
from moevit.data.synth.spec import HUE_FAMILIES, HUE_JITTER_DEG, MAX_ROTATION_DEG

_PLACEMENT_ATTEMPTS = 50
# At most: every object, plus the crowd.
MAX_ANNOTATIONS = real_spec.COCO_MAX_OBJECTS + 1
_USED_NAMES = {category_id: name for name, category_id in real_spec.COCO_USED_CATEGORIES.items()}


def categories() -> list[dict]:
    """The JSON's 80 categories at COCO 2017's ids; the ones never annotated are named unused-<id>."""
    return [
        {
            "id": category_id,
            "name": _USED_NAMES.get(category_id, f"unused-{category_id}"),
            "supercategory": "colour" if category_id in _USED_NAMES else "none",
        }
        for category_id in real_spec.COCO_CATEGORY_IDS
    ]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean (H, W) mask: run lengths over the column-major pixel order,
    starting with a (possibly empty) run of zeros."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(boundaries).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _random_category(rng: np.random.Generator) -> str:
    return list(real_spec.COCO_USED_CATEGORIES)[rng.integers(len(real_spec.COCO_USED_CATEGORIES))]


def _random_outline(rng: np.random.Generator, size: float) -> np.ndarray:
    """A random shape `size` px wide, rotated, centred on the origin."""
    return shape_polygon(
        SHAPES[rng.integers(len(SHAPES))], size, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    )


def _paint(canvas: np.ndarray, category: str, polygon: np.ndarray, rng: np.random.Generator) -> tuple:
    colors = hue_shades(rng, HUE_FAMILIES[category], HUE_JITTER_DEG["imagenet"])
    return paint_polygon(canvas, polygon, TEXTURES[rng.integers(len(TEXTURES))], colors, rng)


def _paint_crowd(canvas: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """A cluster of small overlapping shapes of one category; returns its annotation fields and box."""
    height, width = canvas.shape[:2]
    category = _random_category(rng)
    extent = rng.uniform(*real_spec.COCO_CROWD_EXTENT)
    low = rng.uniform((0, 0), (width - extent, height - extent))
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(real_spec.COCO_CROWD_MEMBERS[0], real_spec.COCO_CROWD_MEMBERS[1] + 1))):
        size = rng.uniform(*real_spec.COCO_CROWD_MEMBER_SIZE)
        # The member's centre anywhere in the square that keeps it inside the crowd's extent.
        outline = _random_outline(rng, size) + low + size / 2 + rng.uniform(0, extent - size, size=2)
        alpha, box = _paint(canvas, category, outline, rng)
        mask[box] |= alpha >= 0.5
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0, x1, y1 = columns[0], rows[0], columns[-1] + 1, rows[-1] + 1
    fields = {
        "category_id": real_spec.COCO_USED_CATEGORIES[category],
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(mask.sum()),
        "iscrowd": 1,
        "segmentation": uncompressed_rle(mask),
    }
    return fields, np.array([x0, y0, x1, y1], np.float64)


def render_real_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, list[dict]]:
    """One true-resolution detection image (H, W, 3) uint8 and its annotations' COCO fields."""
    height, width = real_spec.COCO_SIZES[rng.integers(len(real_spec.COCO_SIZES))]
    background_color = neutral_color(rng)
    canvas = smooth_background(height, width, rng, background_color, variation=20)
    clutter = texture(
        TEXTURES[rng.integers(len(TEXTURES))], height, width, [background_color, neutral_color(rng)], rng
    )
    canvas = composite(canvas, clutter, np.full((height, width), rng.uniform(0.1, 0.25), np.float32))
    fields, boxes = [], []
    if index % real_spec.COCO_EMPTY_PERIOD != real_spec.COCO_EMPTY_PERIOD - 1:
        if index % real_spec.COCO_CROWD_PERIOD == 1:
            crowd, crowd_box = _paint_crowd(canvas, rng)
            fields.append(crowd)
            boxes.append(crowd_box)
        count = int(rng.integers(1, real_spec.COCO_MAX_OBJECTS + 1))
        low, high = np.log(real_spec.COCO_OBJECT_SIZE)
        objects = [
            (_random_category(rng), _random_outline(rng, float(np.exp(rng.uniform(low, high)))))
            for _ in range(count)
        ]
        # Largest first: they need the most free room, and small ones still fit between them.
        objects.sort(key=lambda item: -float(np.ptp(item[1], axis=0).max()))
        for category, template in objects:
            placed = place_apart(template, height, width, boxes, rng, _PLACEMENT_ATTEMPTS)
            if placed is None:
                continue  # no free room left: the image gets fewer objects
            polygon, box = placed
            _paint(canvas, category, polygon, rng)
            fields.append(annotation_fields(real_spec.COCO_USED_CATEGORIES[category], polygon))
            boxes.append(box)
    return to_uint8(canvas, rng, rng.uniform(2, 8)), fields


def write_coco_real(root: Path, seed: int, images_per_split: Mapping[str, int]) -> dict:
    """Write every split of the true-resolution detection dataset under `root`; returns its summary.

    Each image is seeded from (seed, "coco", split, index), as in the toy presets.
    """
    for split, count in images_per_split.items():
        write_coco_split(root, seed, split, count, render_real_sample, categories(), MAX_ANNOTATIONS)
    return {"num_classes": len(real_spec.COCO_CATEGORY_IDS), "images": dict(images_per_split)}
