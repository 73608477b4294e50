"""Classification transforms (ImageNet).

Train: ``RandomResizedCrop`` (area ``crop_scale``, by default 0.08-1, ratio 3/4-4/3, the
Inception/ResNet recipe used by DeiT and timm) and a horizontal flip. Eval: resize the shorter side to
``image_size / crop_pct`` and center-crop ``image_size`` (timm's ``crop_pct``; 0.875 is the classic
ImageNet 224/256 protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from moevit.config.schema import ImageNetTransforms


def _geometry(
    train: bool, image_size: int, settings: ImageNetTransforms, crop_scale: tuple[float, float]
) -> list[Callable]:
    if train:
        return [
            v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
            v2.RandomHorizontalFlip(settings.hflip),
        ]
    return [v2.Resize(round(image_size / settings.crop_pct), antialias=True), v2.CenterCrop(image_size)]


def build(
    train: bool,
    image_size: int,
    settings: ImageNetTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform: geometry, then a float32 image normalized with `mean` / `std`."""
    steps = _geometry(train, image_size, settings, crop_scale)
    # ToDtype with a single dtype converts images only; masks stay uint8 and boxes keep their values.
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
