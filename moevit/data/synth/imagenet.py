"""Writes the synthetic classification dataset in the ImageNet (ILSVRC2012) folder layout.

Layout, as the ILSVRC2012 train archive unpacks and as the validation images are usually sorted
(torchvision's ImageFolder layout), plus the class list of the Kaggle release:
    imagenet/train/<wnid>/<wnid>_<n>.JPEG
    imagenet/val/<wnid>/ILSVRC2012_val_<n:08d>.JPEG
    imagenet/LOC_synset_mapping.txt          one "<wnid> <class name>" line per class
Each image shows one large textured shape on a smooth background; its class is the (shape, texture)
pair of spec.IMAGENET_CLASSES, its wnid "n" + the 1-based class index in 8 digits (sorted = class order).
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from moevit.data.synth.shapes import (
    composite,
    distinct_color,
    random_translation,
    rasterize,
    shape_polygon,
    smooth_background,
    texture,
    to_uint8,
)
from moevit.data.synth.spec import (
    IMAGENET_CLASSES,
    IMAGENET_GRAYSCALE_FRACTION,
    IMAGENET_IMAGE_SIZE,
    IMAGENET_OBJECT_FRACTION,
    JPEG_QUALITY,
    MAX_ROTATION_DEG,
    sample_rng,
)


def wnid(class_index: int) -> str:
    """The WordNet-style folder name of a class, e.g. n00000001 for class 0."""
    return f"n{class_index + 1:08d}"


def class_name(class_index: int) -> str:
    """A readable class name, e.g. "solid circle"."""
    shape, texture_name = IMAGENET_CLASSES[class_index]
    return f"{texture_name} {shape}"


def render_classification_image(
    rng: np.random.Generator, shape: str, texture_name: str, image_size: tuple[int, int]
) -> Image.Image:
    """One RGB (rarely grayscale) image of a `texture_name`-filled `shape`."""
    height, width = image_size
    background_color = rng.uniform(40, 215, size=3)
    canvas = smooth_background(height, width, rng, background_color, variation=35)
    # Both fill colors stand out from the background, so the outline is visible whatever the texture.
    first_color = distinct_color(rng, [background_color], min_distance=80)
    second_color = distinct_color(rng, [background_color, first_color], min_distance=80)
    size = rng.uniform(*IMAGENET_OBJECT_FRACTION) * min(height, width)
    polygon = shape_polygon(shape, size, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    polygon = random_translation(polygon, height, width, rng)
    fill = texture(texture_name, height, width, [first_color, second_color], rng)
    alpha = rasterize(polygon, height, width)
    image = Image.fromarray(to_uint8(composite(canvas, fill, alpha), rng, rng.uniform(2, 8)))
    return image.convert("L") if rng.random() < IMAGENET_GRAYSCALE_FRACTION else image


def write_imagenet(
    root: Path,
    seed: int,
    images_per_class: Mapping[str, int],
    image_size: tuple[int, int] = IMAGENET_IMAGE_SIZE,
) -> dict:
    """Write every split of the classification dataset under `root`; returns its summary.

    Args:
        root: the dataset directory (holds train/ and val/).
        seed: the generator seed; each image is seeded from (seed, "imagenet", split, class, n).
        images_per_class: split name -> number of images per class.
        image_size: (height, width) in pixels.
    """
    for split, count in images_per_class.items():
        for class_index, (shape, texture_name) in enumerate(IMAGENET_CLASSES):
            folder = root / split / wnid(class_index)
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = render_classification_image(
                    sample_rng(seed, "imagenet", split, class_index, n), shape, texture_name, image_size
                )
                if split == "train":
                    file_name = f"{wnid(class_index)}_{n + 1}.JPEG"
                else:
                    file_name = f"ILSVRC2012_val_{class_index * count + n + 1:08d}.JPEG"
                image.save(folder / file_name, format="JPEG", quality=JPEG_QUALITY)
    mapping = "".join(f"{wnid(i)} {class_name(i)}\n" for i in range(len(IMAGENET_CLASSES)))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return {
        "num_classes": len(IMAGENET_CLASSES),
        "images": {split: count * len(IMAGENET_CLASSES) for split, count in images_per_class.items()},
    }
