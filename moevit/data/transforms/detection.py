"""Detection transforms (COCO): ViTDet's large-scale jitter for training, a longest-side resize for eval.

Every image keeps its aspect ratio and ends on an ``image_size`` square canvas, its pixels in the top
left corner and zero padding (the mean colour, since padding follows normalization, as ViTDet pads its
normalized batch) below and to the right of them. Padding only there means box coordinates never shift,
so targets and predictions are in canvas pixels and padding is invisible to them.

- Train (``CocoTransforms.scale_range`` != (1, 1)): torchvision's ``v2.ScaleJitter`` resizes the image
  so that it would fit the square times a factor drawn from ``scale_range`` (ViTDet: 0.1-2.0); a
  fixed ``image_size`` crop at a random offset cuts down a side that came out longer than the square
  (boxes are clipped to it); then the horizontal flip, within the valid extent, and
  ``v2.SanitizeBoundingBoxes`` drops boxes left under 1 px with their labels.
- Train with scale_range (1, 1) (the section left out): the eval resize, then the flip. v2.ScaleJitter
  is not used for it because its float32 size arithmetic truncates, and may leave the fitted side one
  pixel short of the square.
- Eval: ``v2.Resize(size=None, max_size=image_size)``: the longest side becomes ``image_size``.

Each sample records what maps its canvas back to the original image: ``original_size`` (H, W),
``valid_size`` (h, w) of the image inside the canvas, ``scale`` (resized / original, per axis in
(height, width) order; the rounding of the resized size makes the two differ slightly),
``crop_offset`` (top, left) of the crop in resized pixels and ``flipped``. ``boxes_to_original``
undoes the crop and the resize. The crop offset, the jitter factor and the flip are drawn from torch's
generator, which ``moevit.data.seeding`` seeds per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from moevit.config.schema import CocoTransforms


def _on_tv_tensors(sample: dict, function: Callable) -> dict:
    """``function`` applied to the image, boxes (and any mask) of a sample; other entries unchanged."""
    return {
        key: function(value) if isinstance(value, tv_tensors.TVTensor) else value
        for key, value in sample.items()
    }


def _size(sample: dict) -> tuple[int, int]:
    height, width = sample["image"].shape[-2:]
    return int(height), int(width)


def _random_start(length: int, crop: int) -> int:
    """Offset of a ``crop``-long window inside ``length``, uniform over the valid ones (0 if it fits)."""
    return int(torch.randint(0, length - crop + 1, ())) if length > crop else 0


class CocoGeometry:
    """The whole sample-dict transform: resize, (crop, flip,) sanitize, normalize, pad; see the module.

    Args:
        train: random large-scale jitter, crop and flip (True) or the deterministic eval resize.
        image_size: side of the square canvas.
        settings: scale_range and hflip (train only).
        mean: per-channel mean subtracted from the [0, 1] image.
        std: per-channel standard deviation the image is divided by.
    """

    def __init__(
        self,
        train: bool,
        image_size: int,
        settings: CocoTransforms,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self.train, self.image_size = train, image_size
        jitter = train and tuple(settings.scale_range) != (1.0, 1.0)
        self.resize = (
            v2.ScaleJitter((image_size, image_size), tuple(settings.scale_range), antialias=True)
            if jitter
            else v2.Resize(size=None, max_size=image_size, antialias=True)
        )
        self.hflip = settings.hflip if train else 0.0
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1)
        # ToDtype with a single dtype converts images only; boxes keep their values.
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )

    def __call__(self, sample: dict) -> dict:
        original = _size(sample)
        sample = self.resize(sample)
        resized = _size(sample)
        scale = (resized[0] / original[0], resized[1] / original[1])
        top = left = 0
        flipped = False
        if self.train:
            valid = (min(resized[0], self.image_size), min(resized[1], self.image_size))
            top, left = _random_start(resized[0], valid[0]), _random_start(resized[1], valid[1])
            if valid != resized:
                sample = _on_tv_tensors(sample, lambda x: F.crop(x, top, left, *valid))
            flipped = bool(torch.rand(()) < self.hflip)
            if flipped:
                sample = _on_tv_tensors(sample, F.horizontal_flip)
        sample = self.normalize(self.sanitize(sample))
        height, width = _size(sample)
        padding = [0, 0, self.image_size - width, self.image_size - height]  # left, top, right, bottom
        sample = _on_tv_tensors(sample, lambda x: F.pad(x, padding, fill=0))
        sample.update(
            original_size=original,
            valid_size=(height, width),
            scale=scale,
            crop_offset=(top, left),
            flipped=flipped,
        )
        return sample


def boxes_to_original(
    boxes: torch.Tensor, scale: Sequence[float], crop_offset: Sequence[int] = (0, 0)
) -> torch.Tensor:
    """XYXY boxes in canvas pixels -> the original image's pixels: undo the crop, then the resize.

    Args:
        boxes: (N, 4) XYXY, unflipped (a flip is undone by the caller: x -> valid width - x).
        scale: the sample's ``scale`` (height, width factors of the resize).
        crop_offset: the sample's ``crop_offset`` (top, left); (0, 0) in eval.
    """
    scale_y, scale_x = (float(value) for value in scale)
    top, left = (float(value) for value in crop_offset)
    shift = boxes.new_tensor([left, top, left, top])
    factor = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return (boxes + shift) / factor


def build(
    train: bool,
    image_size: int,
    settings: CocoTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform: a float32 normalized image on the image_size canvas and its geometry.

    ``crop_scale`` is classification's and ignored here (detection's jitter is ``settings.scale_range``).
    """
    return CocoGeometry(train, image_size, settings, mean, std)
