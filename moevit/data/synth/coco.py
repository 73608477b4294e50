"""Writes the synthetic detection dataset in the COCO 2017 instances layout.

Layout and JSON as in COCO 2017 (https://cocodataset.org/#format-data):
    coco/train2017/<image id:012d>.jpg, coco/val2017/<image id:012d>.jpg
    coco/annotations/instances_{train,val}2017.json
        info, licenses,
        images       [{id, file_name, width, height, license, coco_url, flickr_url, date_captured}]
        annotations  [{id, image_id, category_id, bbox [x, y, w, h] in pixels, area, iscrowd, segmentation}]
        categories   [{id, name, supercategory}]
In the toy presets each image holds 0-4 separated shapes with random outlines and textures on a faintly
textured, near-grey background; the category is the object's hue family (spec.COCO_CATEGORY_IDS).
Image ids and category ids are not contiguous, as in COCO; `segmentation` is the shape's polygon and
`area` the polygon's area. `write_coco_split` writes any preset's split from a per-image renderer;
the true-resolution `real` preset's renderer (crowds, 80 categories, COCO's image sizes) is in
coco_real.py.
"""

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from moevit.data.synth.shapes import (
    SHAPES,
    TEXTURES,
    composite,
    hue_shades,
    neutral_color,
    polygon_area,
    random_translation,
    rasterize,
    shape_polygon,
    smooth_background,
    texture,
    to_uint8,
)
from moevit.data.synth.spec import (
    COCO_CATEGORY_IDS,
    COCO_EMPTY_IMAGE_FRACTION,
    COCO_IMAGE_SIZE,
    COCO_MAX_OBJECTS,
    COCO_OBJECT_SIZE,
    GENERATOR_VERSION,
    HUE_FAMILIES,
    HUE_JITTER_DEG,
    JPEG_QUALITY,
    MAX_ROTATION_DEG,
    sample_rng,
)

DETECTION_CATEGORIES = tuple(COCO_CATEGORY_IDS)
# Image ids 1, 4, 7, ... for train and 2, 5, 8, ... for val: disjoint between splits and with gaps,
# so that no reader can confuse an image id with a list index.
_IMAGE_ID_STRIDE = 3
_IMAGE_ID_OFFSET = {"train2017": 1, "val2017": 2}
_PLACEMENT_ATTEMPTS = 20
_MIN_GAP_PX = 2.0  # between object boxes: objects never occlude each other, so every box is exact


def coco_image_id(split: str, index: int) -> int:
    """The image id of the `index`-th image of `split` (see _IMAGE_ID_OFFSET)."""
    if split not in _IMAGE_ID_OFFSET:
        raise ValueError(f"unknown COCO split {split!r}; expected one of {tuple(_IMAGE_ID_OFFSET)}")
    return _IMAGE_ID_STRIDE * index + _IMAGE_ID_OFFSET[split]


def boxes_touch(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (x0, y0, x1, y1) boxes come closer than _MIN_GAP_PX."""
    return bool(np.all(a[:2] < b[2:] + _MIN_GAP_PX) and np.all(b[:2] < a[2:] + _MIN_GAP_PX))


def place_apart(
    template: np.ndarray,
    height: int,
    width: int,
    boxes: list[np.ndarray],
    rng: np.random.Generator,
    attempts: int = _PLACEMENT_ATTEMPTS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(polygon, box) of a random translation of `template` inside the image whose box keeps
    _MIN_GAP_PX from every one of `boxes`, drawn up to `attempts` times; None when none fits."""
    for _attempt in range(attempts):
        polygon = random_translation(template, height, width, rng)
        box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
        if not any(boxes_touch(box, other) for other in boxes):
            return polygon, box
    return None


def render_detection_image(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[np.ndarray, list]:
    """One (H, W, 3) uint8 image and its objects as (category name, polygon (K, 2) in pixels) pairs."""
    height, width = image_size
    background_color = neutral_color(rng)
    canvas = smooth_background(height, width, rng, background_color, variation=20)
    # Clutter: a faint grey texture over the whole background, weaker than any object's contrast.
    clutter = texture(
        TEXTURES[rng.integers(len(TEXTURES))], height, width, [background_color, neutral_color(rng)], rng
    )
    canvas = composite(canvas, clutter, np.full((height, width), rng.uniform(0.1, 0.25), np.float32))

    num_objects = (
        0 if rng.random() < COCO_EMPTY_IMAGE_FRACTION else int(rng.integers(1, COCO_MAX_OBJECTS + 1))
    )
    objects, boxes = [], []
    for _ in range(num_objects):
        category = DETECTION_CATEGORIES[rng.integers(len(DETECTION_CATEGORIES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        template = shape_polygon(
            shape, rng.uniform(*COCO_OBJECT_SIZE), rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        )
        placed = place_apart(template, height, width, boxes, rng)
        if placed is None:
            continue  # no free room left: the image gets fewer objects
        polygon, box = placed
        colors = hue_shades(rng, HUE_FAMILIES[category], HUE_JITTER_DEG["coco"])
        fill = texture(TEXTURES[rng.integers(len(TEXTURES))], height, width, colors, rng)
        canvas = composite(canvas, fill, rasterize(polygon, height, width))
        objects.append((category, polygon))
        boxes.append(box)
    return to_uint8(canvas, rng, rng.uniform(2, 8)), objects


def annotation_fields(category_id: int, polygon: np.ndarray) -> dict:
    """The COCO fields of a non-crowd object outlined by `polygon` (K, 2), without its ids."""
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    return {
        "category_id": category_id,
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": round(polygon_area(polygon), 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
    }


def render_toy_sample(
    rng: np.random.Generator, index: int, image_size: tuple[int, int]
) -> tuple[np.ndarray, list]:
    """A toy preset's image and its annotations' COCO fields (see `render_detection_image`)."""
    pixels, objects = render_detection_image(rng, image_size)
    return pixels, [annotation_fields(COCO_CATEGORY_IDS[category], polygon) for category, polygon in objects]


# (generator, image index within its split) -> (H, W, 3) uint8 pixels, [COCO fields of each annotation]
SampleRenderer = Callable[[np.random.Generator, int], tuple[np.ndarray, list[dict]]]


def write_coco_split(
    root: Path,
    seed: int,
    split: str,
    count: int,
    render: SampleRenderer,
    categories: list[dict],
    max_annotations: int,
) -> None:
    """Write `count` images of one split and its instances JSON under `root`.

    Args:
        render: draws one image and its annotations; seeded from (seed, "coco", split, index).
        categories: the JSON's `categories` list.
        max_annotations: the most annotations `render` returns for one image (makes annotation ids).
    """
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        pixels, fields = render(sample_rng(seed, "coco", split, index), index)
        if len(fields) > max_annotations:
            raise ValueError(f"COCO {split} image {index}: {len(fields)} annotations > {max_annotations}")
        image_id = coco_image_id(split, index)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(root / split / file_name, format="JPEG", quality=JPEG_QUALITY)
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": pixels.shape[0],
                "width": pixels.shape[1],
                "date_captured": "",
                "flickr_url": "",
                "id": image_id,
            }
        )
        # Annotation ids from the image id keep them unique across both splits without a running counter.
        annotations += [
            {"id": image_id * (max_annotations + 1) + k, "image_id": image_id, **ann}
            for k, ann in enumerate(fields)
        ]
    instances = {
        "info": {
            "description": "moevit synthetic shapes, COCO 2017 instances format",
            "url": "",
            "version": str(GENERATOR_VERSION),
            "year": 2017,
            "contributor": "moevit.data.synth",
            "date_created": "",
        },
        "licenses": [{"id": 1, "name": "generated data, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(instances, f)


def write_coco(
    root: Path, seed: int, images_per_split: Mapping[str, int], image_size: tuple[int, int] = COCO_IMAGE_SIZE
) -> dict:
    """Write every split of the toy detection dataset under `root`; returns its summary.

    Args:
        root: the dataset directory (holds train2017/, val2017/ and annotations/).
        seed: the generator seed; each image is seeded from (seed, "coco", split, index).
        images_per_split: split name (train2017, val2017) -> number of images.
        image_size: (height, width) in pixels.
    """
    categories = [
        {"id": category_id, "name": name, "supercategory": "colour"}
        for name, category_id in COCO_CATEGORY_IDS.items()
    ]
    for split, count in images_per_split.items():
        write_coco_split(
            root,
            seed,
            split,
            count,
            lambda rng, index: render_toy_sample(rng, index, image_size),
            categories,
            COCO_MAX_OBJECTS,
        )
    return {"num_classes": len(COCO_CATEGORY_IDS), "images": dict(images_per_split)}
