"""Segmentation transforms (ADE20K): mmsegmentation's training pipeline and its test-time resize.

Train, in mmseg's order (``configs/_base_/datasets/ade20k.py``):

1. ``RandomResize(scale, ratio_range, keep_ratio=True)``: r ~ U(ratio_range), target (long, short) =
   ``int(scale * r)``, rescale factor ``min(long / long_edge, short / short_edge)`` (mmcv's
   ``imrescale``); bilinear for the image, nearest for the mask.
2. ``RandomCrop(image_size, cat_max_ratio)``: offsets uniform in ``[0, max(side - crop, 0)]``, clipped
   to the image; while the crop's non-ignored labels are a single class or one class covers at least
   ``cat_max_ratio`` of them, a new crop is drawn (at most 10 checks, as mmseg).
3. ``RandomFlip(prob=hflip)``, horizontal.
4. ``PhotoMetricDistortion`` (when ``photometric_distortion``) on the uint8 image.
5. float, normalized with mean / std, then padded at the bottom / right to ``image_size`` square with 0
   for the image and 255 (ignore) for the mask: mmseg's data preprocessor pads after normalizing,
   so the padding is the mean colour, not black.

Eval: the image is resized to fit ``scale`` keeping its aspect ratio (mmseg's test ``Resize``); the mask
stays at its original size (mmseg loads the annotation after the resize), so the metric is computed at
the original resolution once the logits are resized back (``moevit.eval.segmentation_inference``).

Written by hand, and why: mmseg and mmcv cannot be installed against current torch, and torchvision
has no keep-ratio rescale to a (long, short) bound, no crop retried on the label histogram, and no
colour operation with mmseg's semantics (see ``PhotoMetricDistortion``). The resizes themselves are
torchvision's (``resize_image`` bilinear without antialiasing, as OpenCV's ``INTER_LINEAR`` that mmcv
calls, to within a grey level since OpenCV rounds its weights to 11 bits; ``resize_mask`` nearest,
the same floor mapping as OpenCV's ``INTER_NEAREST``). All randomness is drawn from NumPy's global generator, as mmseg
draws it, which ``moevit.data.seeding`` seeds per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from moevit.config.labels import IGNORE_INDEX
from moevit.config.schema import Ade20kTransforms

# mmseg's PhotoMetricDistortion defaults (the ADE20K recipe uses them as they are).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
CROP_CHECKS = 10  # mmseg's RandomCrop checks at most this many crops against cat_max_ratio


def resolve_scale(settings: Ade20kTransforms, image_size: int) -> tuple[int, int]:
    """The (long, short) resize bound: the settings' ``scale``, else (4, 1) x image_size (mmseg's (2048, 512))."""
    if settings.scale is not None:
        return int(max(settings.scale)), int(min(settings.scale))
    return 4 * image_size, image_size


def rescaled_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """(height, width) after mmcv's ``imrescale`` to ``scale``: the largest size whose long edge fits
    ``max(scale)`` and short edge fits ``min(scale)``, aspect ratio kept, rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.as_subclass(torch.Tensor)


def _check_uint8(image: torch.Tensor, where: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")


def _resize_pair(sample: dict, size: tuple[int, int]) -> dict:
    image = TF.resize_image(
        _plain(sample["image"]), list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False
    )
    mask = TF.resize_mask(_plain(sample["mask"])[None], list(size))[0]
    return {**sample, "image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


class RandomResize:
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)`` on image and mask."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]) -> None:
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, sample: dict) -> dict:
        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = sample["image"].shape[-2:]
        return _resize_pair(sample, rescaled_size(height, width, target))


def crop_is_acceptable(mask: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's test on a crop's labels: more than one class other than ``ignore_index``, and the
    largest one's share below ``cat_max_ratio``."""
    counts = torch.bincount(mask.reshape(-1).long(), minlength=ignore_index + 1)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


class RandomCrop:
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: a ``crop`` x ``crop`` window (smaller where the
    image is), re-drawn while ``crop_is_acceptable`` fails, for at most ``CROP_CHECKS`` checks.

    As in mmseg, each failed check draws the next window, so after 10 failures the 11th window is used
    unchecked. ``cat_max_ratio`` 1 checks nothing (one draw)."""

    def __init__(self, crop: int, cat_max_ratio: float) -> None:
        self.crop, self.cat_max_ratio = crop, cat_max_ratio

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        top = np.random.randint(0, max(height - self.crop, 0) + 1)
        left = np.random.randint(0, max(width - self.crop, 0) + 1)
        return top, top + self.crop, left, left + self.crop

    def window(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        """(y1, y2, x1, x2) of the crop for this mask (slicing clips y2 / x2 to the image)."""
        height, width = mask.shape[-2:]
        box = self._draw(height, width)
        if self.cat_max_ratio < 1:
            for _ in range(CROP_CHECKS):
                y1, y2, x1, x2 = box
                if crop_is_acceptable(mask[y1:y2, x1:x2], self.cat_max_ratio):
                    break
                box = self._draw(height, width)
        return box

    def __call__(self, sample: dict) -> dict:
        y1, y2, x1, x2 = self.window(_plain(sample["mask"]))
        image = _plain(sample["image"])[:, y1:y2, x1:x2]
        mask = _plain(sample["mask"])[y1:y2, x1:x2]
        return {**sample, "image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


class RandomFlip:
    """Horizontal flip of image and mask with probability ``prob``."""

    def __init__(self, prob: float) -> None:
        self.prob = prob

    def __call__(self, sample: dict) -> dict:
        if not np.random.random_sample() < self.prob:
            return sample
        image, mask = _plain(sample["image"]).flip(-1), _plain(sample["mask"]).flip(-1)
        return {**sample, "image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


# OpenCV's 8-bit RGB -> HSV divides with rounded 12-bit fixed-point reciprocal tables (entry 0 is 0).
_HSV_SHIFT = 12
_DIVISORS = torch.arange(1, 256, dtype=torch.float64)
_SATURATION_TABLE = torch.cat([torch.zeros(1), torch.round((255 << _HSV_SHIFT) / _DIVISORS)]).long()
_HUE_TABLE = torch.cat([torch.zeros(1), torch.round((180 << _HSV_SHIFT) / (6 * _DIVISORS))]).long()
# HSV -> RGB: (r, g, b) = tab[index] per hue sector, tab = (v, v(1-s), v(1-s f), v(1-s(1-f))).
_SECTOR_R = torch.tensor([0, 2, 1, 1, 3, 0])
_SECTOR_G = torch.tensor([3, 0, 0, 2, 1, 1])
_SECTOR_B = torch.tensor([1, 1, 3, 0, 0, 2])


def rgb_to_hsv_u8(image: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``COLOR_RGB2HSV`` for uint8: (3, H, W) uint8 -> int64 (H in [0, 180), S, V in [0, 255]).

    V = max, S = 255 (V - min) / V, H = 30 x (the hexcone's sector offset + fraction), each division done
    as OpenCV does it, with the rounded fixed-point tables, so the results are OpenCV's to the unit."""
    red, green, blue = image.long()
    value = torch.maximum(torch.maximum(red, green), blue)
    difference = value - torch.minimum(torch.minimum(red, green), blue)
    half = 1 << (_HSV_SHIFT - 1)
    saturation = torch.div(
        difference * _SATURATION_TABLE[value] + half, 1 << _HSV_SHIFT, rounding_mode="floor"
    )
    hue = torch.where(
        value == red,
        green - blue,
        torch.where(value == green, blue - red + 2 * difference, red - green + 4 * difference),
    )
    hue = torch.div(hue * _HUE_TABLE[difference] + half, 1 << _HSV_SHIFT, rounding_mode="floor")
    hue = torch.where(hue < 0, hue + 180, hue)
    return torch.stack([hue, saturation, value])


def hsv_to_rgb_u8(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``COLOR_HSV2RGB`` for 8-bit HSV (H in [0, 180)): (3, H, W) -> uint8 RGB.

    In float32 as OpenCV: s, v scaled by 1/255, h by 6/180 to a sector in [0, 6) and its fraction f,
    the hexcone's (v, v(1-s), v(1-sf), v(1-s(1-f))) picked per sector, times 255, rounded half to even
    (OpenCV's scalar path; some SIMD builds truncate instead, one grey level lower at most)."""
    hue, saturation, value = hsv.to(torch.float32)
    saturation = saturation * np.float32(1 / 255)
    value = value * np.float32(1 / 255)
    hue = torch.fmod(hue * np.float32(6 / 180), 6.0)
    sector = torch.floor(hue)
    fraction = hue - sector
    table = torch.stack(
        [
            value,
            value * (1 - saturation),
            value * (1 - saturation * fraction),
            value * (1 - saturation * (1 - fraction)),
        ]
    )
    sector = sector.long()
    channels = [table.gather(0, index[sector][None])[0] for index in (_SECTOR_R, _SECTOR_G, _SECTOR_B)]
    return torch.round(torch.stack(channels) * 255).clamp(0, 255).to(torch.uint8)


def _convert(values: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's ``convert``: float32 ``values * alpha + beta``, clipped to [0, 255], truncated to uint8."""
    return (values.to(torch.float32) * alpha + beta).clamp(0, 255).to(torch.uint8)


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` with its defaults, on a uint8 RGB image.

    Each step applies with probability 0.5 (``np.random.randint(2)``), in mmseg's order and with its
    draws: brightness (+ U(-32, 32)); mode = randint(2); contrast (x U(0.5, 1.5)) here if mode == 1;
    saturation (HSV S x U(0.5, 1.5)); hue (HSV H + randint(-18, 18), mod 180); contrast here if mode == 0.
    Every step rounds to uint8 (truncating after clipping to [0, 255]), as mmseg does.

    Written by hand: torchvision's colour operations have other semantics. ``adjust_brightness``
    multiplies where mmseg adds; ``adjust_contrast`` and ``adjust_saturation`` blend with the grey mean
    / grey image where mmseg scales the pixels / OpenCV's uint8 S channel; ``adjust_hue`` shifts a
    float HSV where mmseg shifts OpenCV's 180-step uint8 hue, whose round trip itself quantizes the
    colours. mmseg works on BGR; the HSV of RGB read in the right order is the same.
    """

    def __call__(self, sample: dict) -> dict:
        image = _plain(sample["image"])
        _check_uint8(image, "PhotoMetricDistortion")
        if np.random.randint(2):
            image = _convert(image, beta=np.random.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
        mode = np.random.randint(2)
        if mode == 1:
            image = self._contrast(image)
        if np.random.randint(2):
            hsv = rgb_to_hsv_u8(image)
            hsv[1] = _convert(hsv[1], alpha=np.random.uniform(*SATURATION_RANGE)).long()
            image = hsv_to_rgb_u8(hsv)
        if np.random.randint(2):
            hsv = rgb_to_hsv_u8(image)
            hsv[0] = (hsv[0] + np.random.randint(-HUE_DELTA, HUE_DELTA)) % 180
            image = hsv_to_rgb_u8(hsv)
        if mode == 0:
            image = self._contrast(image)
        return {**sample, "image": tv_tensors.Image(image)}

    @staticmethod
    def _contrast(image: torch.Tensor) -> torch.Tensor:
        if np.random.randint(2):
            return _convert(image, alpha=np.random.uniform(*CONTRAST_RANGE))
        return image


class PadTo:
    """Pads image and mask at the bottom / right to ``size`` x ``size`` (image 0, mask ``IGNORE_INDEX``)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: dict) -> dict:
        height, width = sample["image"].shape[-2:]
        padding = [0, max(self.size - width, 0), 0, max(self.size - height, 0)]
        if not any(padding):
            return sample
        image = F.pad(_plain(sample["image"]), padding, value=0.0)
        mask = F.pad(_plain(sample["mask"]), padding, value=IGNORE_INDEX)
        return {**sample, "image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


class ResizeImageToFit:
    """Eval: the image (not the mask) resized to fit ``scale``, aspect ratio kept (mmseg's test Resize)."""

    def __init__(self, scale: tuple[int, int]) -> None:
        self.scale = scale

    def __call__(self, sample: dict) -> dict:
        image = _plain(sample["image"])
        size = rescaled_size(*image.shape[-2:], self.scale)
        if size != tuple(image.shape[-2:]):
            image = TF.resize_image(
                image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False
            )
        return {**sample, "image": tv_tensors.Image(image)}


def build(
    train: bool,
    image_size: int,
    settings: Ade20kTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform (see the module docstring); ``crop_scale`` is not used here."""
    scale = resolve_scale(settings, image_size)
    # ToDtype with a single dtype converts images only; masks stay uint8.
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if not train:
        return v2.Compose([ResizeImageToFit(scale), *normalize])
    steps: list[Callable] = [
        RandomResize(scale, settings.ratio_range),
        RandomCrop(image_size, settings.cat_max_ratio),
        RandomFlip(settings.hflip),
    ]
    if settings.photometric_distortion:
        steps.append(PhotoMetricDistortion())
    return v2.Compose([*steps, *normalize, PadTo(image_size)])
