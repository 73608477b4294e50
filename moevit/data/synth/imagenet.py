"""Writes the synthetic classification dataset in the ImageNet (ILSVRC2012) folder layout.

Layout, as the ILSVRC2012 train archive unpacks and as the validation images are usually sorted
(torchvision's ImageFolder layout), plus the class list of the Kaggle release:
    imagenet/train/<wnid>/<wnid>_<n>.JPEG
    imagenet/val/<wnid>/ILSVRC2012_val_<n:08d>.JPEG
    imagenet/LOC_synset_mapping.txt          one "<wnid> <class name>" line per class
Each image shows one large shape, random in outline and texture, on a near-grey smooth background;
its class is the object's hue family (spec.IMAGENET_CLASSES), its wnid "n" + the 1-based class index
in 8 digits (sorted = class order). The true-resolution `real` preset draws each image's size from
ImageNet's common sizes (about 500 x 375) and adds ImageNet's odd files: a PNG and a CMYK JPEG, both
named .JPEG (real_spec.py).
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from moevit.data.synth import real_spec
from moevit.data.synth.shapes import (
    SHAPES,
    TEXTURES,
    composite,
    hue_shades,
    neutral_color,
    random_translation,
    rasterize,
    shape_polygon,
    smooth_background,
    texture,
    to_uint8,
)
from moevit.data.synth.spec import (
    HUE_FAMILIES,
    HUE_JITTER_DEG,
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
    """A readable class name, e.g. "red"."""
    return IMAGENET_CLASSES[class_index]


def render_classification_image(
    rng: np.random.Generator,
    hue_deg: float,
    image_size: tuple[int, int],
    jitter_deg: float = HUE_JITTER_DEG["imagenet"],
) -> Image.Image:
    """One RGB (rarely grayscale) image of a random shape with a random texture in two shades of a hue
    within +-`jitter_deg` of `hue_deg`."""
    height, width = image_size
    canvas = smooth_background(height, width, rng, neutral_color(rng), variation=20)
    shape, texture_name = SHAPES[rng.integers(len(SHAPES))], TEXTURES[rng.integers(len(TEXTURES))]
    size = rng.uniform(*IMAGENET_OBJECT_FRACTION) * min(height, width)
    polygon = shape_polygon(shape, size, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    polygon = random_translation(polygon, height, width, rng)
    fill = texture(texture_name, height, width, hue_shades(rng, hue_deg, jitter_deg), rng)
    alpha = rasterize(polygon, height, width)
    image = Image.fromarray(to_uint8(composite(canvas, fill, alpha), rng, rng.uniform(2, 8)))
    return image.convert("L") if rng.random() < IMAGENET_GRAYSCALE_FRACTION else image


def _save(image: Image.Image, path: Path, odd_format: str | None) -> None:
    """Save as JPEG, or as one of ImageNet's odd files (real_spec.IMAGENET_ODD_FILES) under the same name."""
    if odd_format == "PNG":
        image.save(path, format="PNG")
    elif odd_format == "CMYK":
        image.convert("RGB").convert("CMYK").save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)


def write_imagenet(
    root: Path,
    seed: int,
    images_per_class: Mapping[str, int],
    image_size: tuple[int, int] = IMAGENET_IMAGE_SIZE,
    true_resolution: bool = False,
) -> dict:
    """Write every split of the classification dataset under `root`; returns its summary.

    Args:
        root: the dataset directory (holds train/ and val/).
        seed: the generator seed; each image is seeded from (seed, "imagenet", split, class, n).
        images_per_class: split name -> number of images per class.
        image_size: (height, width) in pixels; ignored with `true_resolution`.
        true_resolution: each image's size drawn from real_spec.IMAGENET_SIZES (seeded from
            (seed, "imagenet", split, class, n, "size")), plus ImageNet's odd files
            (real_spec.IMAGENET_ODD_FILES).
    """
    for split, count in images_per_class.items():
        for class_index, family in enumerate(IMAGENET_CLASSES):
            folder = root / split / wnid(class_index)
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                key = ("imagenet", split, class_index, n)
                size = image_size
                if true_resolution:
                    choices = real_spec.IMAGENET_SIZES
                    size = choices[sample_rng(seed, *key, "size").integers(len(choices))]
                image = render_classification_image(sample_rng(seed, *key), HUE_FAMILIES[family], size)
                if split == "train":
                    file_name = f"{wnid(class_index)}_{n + 1}.JPEG"
                else:
                    file_name = f"ILSVRC2012_val_{class_index * count + n + 1:08d}.JPEG"
                odd_format = (
                    real_spec.IMAGENET_ODD_FILES.get((split, class_index, n)) if true_resolution else None
                )
                _save(image, folder / file_name, odd_format)
    mapping = "".join(f"{wnid(i)} {class_name(i)}\n" for i in range(len(IMAGENET_CLASSES)))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return {
        "num_classes": len(IMAGENET_CLASSES),
        "images": {split: count * len(IMAGENET_CLASSES) for split, count in images_per_class.items()},
    }
