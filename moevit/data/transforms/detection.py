"""Detection transforms (COCO).

Train: resize to a fixed ``image_size`` square (aspect ratio not kept: a fixed square input keeps the
ViT's patch grid and batch shapes constant) and a horizontal flip; ``SanitizeBoundingBoxes`` then
drops boxes that shrank under 1 px, together with their labels. Eval: the same resize and sanitizing,
no flip. Boxes come out in the resized image's pixels; mapping predictions back to the original image
uses the width/height of the COCO image record.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision.transforms import v2

from moevit.config.schema import CocoTransforms


def geometry(
    train: bool, image_size: int, settings: CocoTransforms, crop_scale: tuple[float, float]
) -> list[Callable]:
    flip = [v2.RandomHorizontalFlip(settings.hflip)] if train else []
    return [v2.Resize((image_size, image_size), antialias=True), *flip, v2.SanitizeBoundingBoxes(min_size=1)]
