"""Segmentation transforms (ADE20K).

Train: as mmsegmentation's ADE20K recipe, simplified: random scale (shorter side drawn from 0.5x-2x
``image_size``), random crop of ``image_size`` (padding with 0 for the image and 255 = ignore for the
mask when the scaled image is smaller), horizontal flip. Eval: resize image and mask to the
``image_size`` square (nearest neighbour for the mask, as v2 does for every ``Mask``), so mIoU is
measured at that resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from moevit.config.labels import IGNORE_INDEX
from moevit.config.schema import Ade20kTransforms

SEGMENTATION_SCALE_RANGE = (0.5, 2.0)


def _geometry(
    train: bool, image_size: int, settings: Ade20kTransforms, crop_scale: tuple[float, float]
) -> list[Callable]:
    if not train:
        return [v2.Resize((image_size, image_size), antialias=True)]
    low, high = SEGMENTATION_SCALE_RANGE
    return [
        # RandomResize draws the shorter side from [min_size, max_size); +1 makes 2x reachable.
        v2.RandomResize(round(low * image_size), round(high * image_size) + 1, antialias=True),
        v2.RandomCrop(
            image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        ),
        v2.RandomHorizontalFlip(settings.hflip),
    ]


def build(
    train: bool,
    image_size: int,
    settings: Ade20kTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform: geometry, then a float32 image normalized with `mean` / `std`."""
    steps = _geometry(train, image_size, settings, crop_scale)
    # ToDtype with a single dtype converts images only; masks stay uint8 and boxes keep their values.
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
