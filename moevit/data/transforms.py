"""Training and evaluation transforms for the three tasks, on sample dicts (torchvision.transforms.v2).

v2 transforms read the tv_tensors in a sample (``Image``, ``BoundingBoxes``, ``Mask``) and apply the
same geometry to all of them, so boxes and masks stay aligned with the image; other entries
(``label``, ``key``, ``image_id``, ``num_skipped``) pass through unchanged. Every pipeline ends in a
float32 image normalized with the ImageNet mean/std, of shape (3, image_size, image_size), so batches
stack without padding.

Choices:
- classification, train: ``RandomResizedCrop`` (area ``crop_scale``, by default 0.08-1, ratio 3/4-4/3,
  the Inception/ResNet recipe used by DeiT and timm) and a horizontal flip. Eval: resize the shorter side to
  ``image_size / crop_pct`` and center-crop ``image_size`` (timm's ``crop_pct``; 0.875 is the
  classic ImageNet 224/256 protocol).
- detection, train: resize to a fixed ``image_size`` square (aspect ratio not kept: a fixed square
  input keeps the ViT's patch grid and batch shapes constant) and a horizontal flip;
  ``SanitizeBoundingBoxes`` then drops boxes that shrank under 1 px, together with their labels. Eval:
  the same resize and sanitizing, no flip. Boxes come out in the resized image's pixels; mapping
  predictions back to the original image uses the width/height of the COCO image record.
- segmentation, train: as mmsegmentation's ADE20K recipe, simplified: random scale (shorter side drawn
  from 0.5x-2x ``image_size``), random crop of ``image_size`` (padding with 0 for the image and 255 =
  ignore for the mask when the scaled image is smaller), horizontal flip. Eval: resize image and mask
  to the ``image_size`` square (nearest neighbour for the mask, as v2 does for every ``Mask``), so
  mIoU is measured at that resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from moevit.config.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEGMENTATION_SCALE_RANGE = (0.5, 2.0)
DEFAULT_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's (and timm's) area range


def _classification(train: bool, image_size: int, crop_pct: float, crop_scale) -> list[Callable]:
    if train:
        return [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    return [v2.Resize(round(image_size / crop_pct), antialias=True), v2.CenterCrop(image_size)]


def _detection(train: bool, image_size: int, crop_pct: float, crop_scale) -> list[Callable]:
    flip = [v2.RandomHorizontalFlip()] if train else []
    return [v2.Resize((image_size, image_size), antialias=True), *flip, v2.SanitizeBoundingBoxes(min_size=1)]


def _segmentation(train: bool, image_size: int, crop_pct: float, crop_scale) -> list[Callable]:
    if not train:
        return [v2.Resize((image_size, image_size), antialias=True)]
    low, high = SEGMENTATION_SCALE_RANGE
    return [
        # RandomResize draws the shorter side from [min_size, max_size); +1 makes 2x reachable.
        v2.RandomResize(round(low * image_size), round(high * image_size) + 1, antialias=True),
        v2.RandomCrop(
            image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        ),
        v2.RandomHorizontalFlip(),
    ]


_GEOMETRY = {"classification": _classification, "detection": _detection, "segmentation": _segmentation}


def build_transforms(
    task_type: str,
    train: bool,
    image_size: int,
    crop_pct: float = 0.875,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Returns the transform applied to each sample dict of a ``task_type`` reader.

    Args:
        task_type: "classification", "detection" or "segmentation".
        train: random augmentation (True) or the deterministic evaluation transform (False).
        image_size: side of the square output image.
        crop_pct: classification eval only: fraction of the resized shorter side kept by the center crop.
        crop_scale: classification train only: range of the crop's share of the image area.
        mean: per-channel mean subtracted from the [0, 1] image.
        std: per-channel standard deviation the image is divided by.
    """
    if task_type not in _GEOMETRY:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {sorted(_GEOMETRY)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    geometry = _GEOMETRY[task_type](train, image_size, crop_pct, tuple(crop_scale))
    # ToDtype with a single dtype converts images only; masks stay uint8 and boxes keep their values.
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
