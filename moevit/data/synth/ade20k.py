"""Writes the synthetic segmentation dataset in the ADE20K SceneParsing (ADEChallengeData2016) layout.

Layout as in ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu):
    ade20k/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<n:08d>.jpg
    ade20k/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_<n:08d>.png
    ade20k/ADEChallengeData2016/objectInfo150.txt    Idx, Ratio, Train, Val, Name (tab-separated)
Annotations are single-channel uint8 PNGs, same basename and size as their image: 0 = "other",
1..C = spec.ADE20K_CLASSES. Each image is a map of 3-6 regions with bent borders; each region is filled
with one texture in its own colors (its class) or, rarely, with a smooth gradient ("other").
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from moevit.data.synth.shapes import distinct_color, region_map, smooth_background, texture, to_uint8
from moevit.data.synth.spec import (
    ADE20K_CLASSES,
    ADE20K_IMAGE_SIZE,
    ADE20K_OTHER_FRACTION,
    JPEG_QUALITY,
    sample_rng,
)

DATASET_DIR = "ADEChallengeData2016"
_FILE_PREFIX = {"training": "ADE_train", "validation": "ADE_val"}
_REGIONS = (3, 6)  # regions per image, inclusive: about 25-35 px across on a 64 px image


def render_segmentation_pair(
    rng: np.random.Generator, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 label map."""
    height, width = image_size
    regions = region_map(height, width, int(rng.integers(_REGIONS[0], _REGIONS[1] + 1)), rng)
    canvas = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    for region in range(regions.max() + 1):
        inside = regions == region
        first_color = rng.uniform(0, 255, size=3)
        if rng.random() < ADE20K_OTHER_FRACTION:
            layer, label = smooth_background(height, width, rng, first_color, variation=35), 0
        else:
            class_index = int(rng.integers(len(ADE20K_CLASSES)))
            second_color = distinct_color(rng, [first_color], min_distance=90)
            layer = texture(ADE20K_CLASSES[class_index], height, width, [first_color, second_color], rng)
            label = class_index + 1
        canvas[inside] = layer[inside]
        labels[inside] = label
    return to_uint8(canvas, rng, rng.uniform(2, 8)), labels


def _object_info(
    class_names: Sequence[str], pixel_counts: np.ndarray, images_with_class: Mapping[str, np.ndarray]
) -> str:
    """objectInfo150.txt: per class its share of all pixels and the number of images containing it."""
    ratio = pixel_counts / max(pixel_counts.sum(), 1)
    train = images_with_class.get("training", np.zeros_like(pixel_counts))
    val = images_with_class.get("validation", np.zeros_like(pixel_counts))
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    rows += [
        f"{c}\t{ratio[c]:.4f}\t{train[c]}\t{val[c]}\t{name}" for c, name in enumerate(class_names, start=1)
    ]
    return "\n".join(rows) + "\n"


# generator -> (H, W, 3) uint8 image, (H, W) uint8 label map (0 = other, 1..C = classes)
PairRenderer = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


def write_ade20k(
    root: Path,
    seed: int,
    images_per_split: Mapping[str, int],
    image_size: tuple[int, int] = ADE20K_IMAGE_SIZE,
    render: PairRenderer | None = None,
    class_names: Sequence[str] = ADE20K_CLASSES,
) -> dict:
    """Write every split of the segmentation dataset under `root`; returns its summary.

    Args:
        root: the dataset directory (ADEChallengeData2016/ is created inside it).
        seed: the generator seed; each image is seeded from (seed, "ade20k", split, index).
        images_per_split: split name (training, validation) -> number of images.
        image_size: (height, width) in pixels of the toy images; unused with `render`.
        render: draws one image and its label map; default: the toy `render_segmentation_pair`.
        class_names: the names of labels 1..C, for objectInfo150.txt and the summary's class count.
    """
    if render is None:
        render = functools.partial(render_segmentation_pair, image_size=image_size)
    dataset = root / DATASET_DIR
    pixel_counts = np.zeros(len(class_names) + 1, np.int64)
    images_with_class = {}
    for split, count in images_per_split.items():
        if split not in _FILE_PREFIX:
            raise ValueError(f"unknown ADE20K split {split!r}; expected one of {tuple(_FILE_PREFIX)}")
        (dataset / "images" / split).mkdir(parents=True, exist_ok=True)
        (dataset / "annotations" / split).mkdir(parents=True, exist_ok=True)
        images_with_class[split] = np.zeros_like(pixel_counts)
        for index in range(count):
            pixels, labels = render(sample_rng(seed, "ade20k", split, index))
            stem = f"{_FILE_PREFIX[split]}_{index + 1:08d}"
            Image.fromarray(pixels).save(
                dataset / "images" / split / f"{stem}.jpg", format="JPEG", quality=JPEG_QUALITY
            )
            Image.fromarray(labels).save(dataset / "annotations" / split / f"{stem}.png", format="PNG")
            histogram = np.bincount(labels.reshape(-1), minlength=len(pixel_counts))
            pixel_counts += histogram
            images_with_class[split] += histogram > 0
    (dataset / "objectInfo150.txt").write_text(_object_info(class_names, pixel_counts, images_with_class))
    return {"num_classes": len(class_names), "images": dict(images_per_split)}
