"""The `real` preset's segmentation images: ADE20K's sizes and 150 classes (numbers and why: real_spec.py).

Same layout as the toy presets (synth/ade20k.py). An image is a map of 6-14 regions with bent borders.
A region of class c (PNG value 1..150) is filled with a texture in a saturated colour of one hue family
at one lightness level and a contrasting grey: the class is the (texture, hue family, lightness) triple,
all three visible in any patch of the region. A region of "other" (PNG value 0, ignored under
reduce_zero_label) is a smooth gradient of a random colour.
"""

import colorsys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from moevit.data.synth import real_spec
from moevit.data.synth.ade20k import write_ade20k
from moevit.data.synth.shapes import TEXTURES, region_map, smooth_background, texture, to_uint8
from moevit.data.synth.spec import ADE20K_OTHER_FRACTION, HUE_FAMILIES, HUE_JITTER_DEG

_LIGHTNESS = tuple(real_spec.ADE20K_LIGHTNESS)
# Label 1 + (texture * 10 + hue family) * 3 + lightness, in that nesting order.
CLASSES = tuple(
    f"{texture_name}-{family}-{lightness}"
    for texture_name in TEXTURES
    for family in HUE_FAMILIES
    for lightness in _LIGHTNESS
)


def class_attributes(label: int) -> tuple[str, str, str]:
    """(texture, hue family, lightness) of PNG value `label` in 1..150."""
    if not 1 <= label <= len(CLASSES):
        raise ValueError(f"ADE20K class label {label} outside 1..{len(CLASSES)}")
    texture_name, family, lightness = CLASSES[label - 1].split("-")
    return texture_name, family, lightness


def _class_colors(rng: np.random.Generator, family: str, lightness: str) -> list[np.ndarray]:
    """A saturated colour of the family at the lightness level, and a grey that contrasts with it."""
    hue = (HUE_FAMILIES[family] + rng.uniform(-HUE_JITTER_DEG["imagenet"], HUE_JITTER_DEG["imagenet"])) % 360
    value = rng.uniform(*real_spec.ADE20K_LIGHTNESS[lightness])
    color = np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.65, 1.0), value)) * 255
    grey_level = rng.uniform(0.85, 1.0) if lightness == "dark" else rng.uniform(0.08, 0.22)
    return [color, np.full(3, grey_level * 255)]


def render_real_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One true-resolution (H, W, 3) uint8 image and its (H, W) uint8 label map (0..150)."""
    height, width = real_spec.ADE20K_SIZES[rng.integers(len(real_spec.ADE20K_SIZES))]
    low, high = real_spec.ADE20K_REGIONS
    regions = region_map(
        height, width, int(rng.integers(low, high + 1)), rng, real_spec.ADE20K_BORDER_WARP_PX
    )
    canvas = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    for region in range(regions.max() + 1):
        inside = regions == region
        if rng.random() < ADE20K_OTHER_FRACTION:
            layer, label = smooth_background(height, width, rng, rng.uniform(0, 255, size=3), variation=35), 0
        else:
            label = int(rng.integers(1, len(CLASSES) + 1))
            texture_name, family, lightness = class_attributes(label)
            layer = texture(texture_name, height, width, _class_colors(rng, family, lightness), rng)
        canvas[inside] = layer[inside]
        labels[inside] = label
    return to_uint8(canvas, rng, rng.uniform(2, 8)), labels


def write_ade20k_real(root: Path, seed: int, images_per_split: Mapping[str, int]) -> dict:
    """Write every split of the true-resolution segmentation dataset under `root`; returns its summary.

    Each image is seeded from (seed, "ade20k", split, index), as in the toy presets.
    """
    return write_ade20k(root, seed, images_per_split, render=render_real_pair, class_names=CLASSES)
