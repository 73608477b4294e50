"""What the synthetic datasets contain: class lists, image sizes, image counts and per-sample seeding.

All defaults of the generator live here. The design is described in datasets/synthetic.md: the three
tasks share two visual vocabularies (shapes.SHAPES and shapes.TEXTURES) and each task reads a
different part of them, which gives a multi-task MoE both shared and task-specific structure.
"""

import zlib
from dataclasses import dataclass

import numpy as np

from moevit.data.synth.shapes import TEXTURES

# Bump whenever a change alters any written byte: callers compare it to decide whether to rewrite.
GENERATOR_VERSION = 2

# Colour: the third vocabulary (after shapes.SHAPES and shapes.TEXTURES). Ten hue families 36 degrees
# apart; an object of a family is drawn in two shades (light and dark) of a hue within
# +-HUE_JITTER_DEG[task] of the family's centre, on a near-grey background.
HUE_FAMILIES = {
    "red": 0.0,
    "orange": 36.0,
    "yellow": 72.0,
    "lime": 108.0,
    "green": 144.0,
    "teal": 180.0,
    "azure": 216.0,
    "blue": 252.0,
    "violet": 288.0,
    "magenta": 324.0,
}

# Classification: the hue family of the object, 10 classes; shape and texture are random. (Classes
# that were (shape, texture) pairs took a from-scratch ViT several hundred steps to leave chance, far
# beyond the demo's budget: a plain timm ViT-Ti stayed at chance for 100 steps even on texture alone,
# while hue families reached 0.98 top-1 in 100 steps; see datasets/synthetic.md.)
IMAGENET_CLASSES = tuple(HUE_FAMILIES)
# Real ImageNet contains grayscale JPEGs (about 0.3 %); a few here make the reader's RGB conversion run.
IMAGENET_GRAYSCALE_FRACTION = 1 / 64

# Detection: one category per second hue family (72 degrees apart), whatever the object's shape and
# texture. Ids have gaps, like COCO's 1..90 for 80 categories, so that the contiguous-label mapping
# is exercised.
COCO_CATEGORY_IDS = {"red": 1, "yellow": 3, "green": 4, "azure": 7, "violet": 11}
# Hue spread around a family's centre: well inside half the spacing between the task's classes
# (18 degrees for classification, 36 for detection), so that every label is unambiguous.
HUE_JITTER_DEG = {"imagenet": 10.0, "coco": 20.0}
COCO_MAX_OBJECTS = 4
# Real COCO has images without annotations; a few here exercise that path.
COCO_EMPTY_IMAGE_FRACTION = 1 / 32

# Segmentation: one class per texture, whatever the region's colors; label 0 is "other" (ignored by
# ADE20K's reduce_zero_label), labels 1..len(TEXTURES) follow TEXTURES.
ADE20K_CLASSES = TEXTURES
ADE20K_OTHER_FRACTION = 0.1  # share of regions labelled "other", close to ADE20K's unlabelled pixels

# Object sizes: a classification object covers 45-75 % of the image side; detection objects are 16-44 px
# wide before a rotation of up to +-15 degrees: at least two 8 px patches, so that a box a pixel off
# keeps a high IoU. (20-48 px with fainter clutter was tried: one object fewer in 4 images, and a probe
# detector did not learn faster; see datasets/synthetic.md.)
IMAGENET_OBJECT_FRACTION = (0.45, 0.75)
COCO_OBJECT_SIZE = (16.0, 44.0)
MAX_ROTATION_DEG = 15.0

# Image sizes (height, width). With 8 px patches: 64 px gives 8 x 8 tokens, cheap enough for training on
# CPU, and still shows several periods of every texture on a classification object (29-48 px) and on a
# segmentation region (about 25-35 px). Detection needs room for several separated objects of 16-44 px,
# hence 96 px.
IMAGENET_IMAGE_SIZE = (64, 64)
COCO_IMAGE_SIZE = (96, 96)
ADE20K_IMAGE_SIZE = (64, 64)

# Fixed JPEG quality: realistic compression artefacts, textures intact, and deterministic bytes.
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SynthSize:
    """Image counts of one `size` preset, per split name.

    Args:
        imagenet_per_class: images per class and split (train, val).
        coco: images per split (train2017, val2017).
        ade20k: images per split (training, validation).
        true_resolution: draw the images at the real datasets' sizes and with their label structure
            (synth/real_spec.py) instead of the small fixed-size toy images above.
    """

    imagenet_per_class: dict[str, int]
    coco: dict[str, int]
    ade20k: dict[str, int]
    true_resolution: bool = False


SIZES = {
    # tiny: a few seconds to write, for tests; every class still has several images per split.
    "tiny": SynthSize(
        imagenet_per_class={"train": 16, "val": 8},
        coco={"train2017": 48, "val2017": 24},
        ade20k={"training": 48, "validation": 24},
    ),
    # small: the demo. Enough images that a few minutes of training on 2 CPU cores does not exhaust
    # (and memorise) them; validation sets large enough for stable metrics yet quick to evaluate.
    "small": SynthSize(
        imagenet_per_class={"train": 300, "val": 50},
        coco={"train2017": 2000, "val2017": 250},
        ade20k={"training": 2000, "validation": 250},
    ),
    # real: a rehearsal of the paper configs at true resolution (synth/real_spec.py), not a training
    # set. A few dozen images per dataset write in seconds; every val split is even so that two ranks
    # evaluate the same number of images.
    "real": SynthSize(
        imagenet_per_class={"train": 4, "val": 2},
        coco={"train2017": 24, "val2017": 8},
        ade20k={"training": 24, "validation": 8},
        true_resolution=True,
    ),
}


def sample_rng(seed: int, *key: str | int) -> np.random.Generator:
    """The generator of one sample, seeded from (seed, key...), e.g. key = ("coco", "val2017", 17).

    Seeding per sample makes each file independent of generation order, and a smaller preset a prefix of
    a larger one. Strings enter through CRC32 because Python's hash() changes between processes.
    """
    entropy = [seed] + [zlib.crc32(part.encode()) if isinstance(part, str) else part for part in key]
    return np.random.default_rng(entropy)
