"""Detection transforms (COCO).

Train: resize to a fixed ``image_size`` square (aspect ratio not kept: a fixed square input keeps the
ViT's patch grid and batch shapes constant) and a horizontal flip; ``SanitizeBoundingBoxes`` then
drops boxes that shrank under 1 px, together with their labels. Eval: the same resize and sanitizing,
no flip. Boxes come out in the resized image's pixels; mapping predictions back to the original image
uses the width/height of the COCO image record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from moevit.config.schema import CocoTransforms


def _geometry(
    train: bool, image_size: int, settings: CocoTransforms, crop_scale: tuple[float, float]
) -> list[Callable]:
    flip = [v2.RandomHorizontalFlip(settings.hflip)] if train else []
    return [v2.Resize((image_size, image_size), antialias=True), *flip, v2.SanitizeBoundingBoxes(min_size=1)]


def build(
    train: bool,
    image_size: int,
    settings: CocoTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform: geometry, then a float32 image normalized with `mean` / `std`."""
    steps = _geometry(train, image_size, settings, crop_scale)
    # ToDtype with a single dtype converts images only; masks stay uint8 and boxes keep their values.
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
