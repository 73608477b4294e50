"""Segmentation transforms (ADE20K).

Train: as mmsegmentation's ADE20K recipe, simplified: random scale (shorter side drawn from 0.5x-2x
``image_size``), random crop of ``image_size`` (padding with 0 for the image and 255 = ignore for the
mask when the scaled image is smaller), horizontal flip. Eval: resize image and mask to the
``image_size`` square (nearest neighbour for the mask, as v2 does for every ``Mask``), so mIoU is
measured at that resolution.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import tv_tensors
from torchvision.transforms import v2

from moevit.config.labels import IGNORE_INDEX
from moevit.config.schema import Ade20kTransforms

SEGMENTATION_SCALE_RANGE = (0.5, 2.0)


def geometry(
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
