"""Classification transforms (ImageNet): timm's `create_transform`, used as is, on our sample dicts.

Train: timm's ImageNet training pipeline: RandomResizedCrop (area ``crop_scale``, ratio 3/4-4/3), flip,
then RandAugment / AutoAugment / AugMix when ``auto_augment`` names a policy (else colour jitter when
``color_jitter`` > 0), normalization and random erasing. Eval: timm's eval pipeline: resize the
shorter side to ``floor(image_size / crop_pct)`` and center-crop ``image_size`` (0.875 is the classic
224/256 protocol). With the settings' defaults the training pipeline is RandomResizedCrop and a flip.

Only the adapter is written here: timm's transforms take a PIL image and return a float tensor, while
our readers yield sample dicts holding a uint8 ``tv_tensors.Image`` (3, H, W). Every random draw timm
makes (Python's ``random``, NumPy's and torch's global generators) is seeded per sample by
moevit.data.seeding. Mixup/CutMix work on batches: see moevit.data.mixup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.data import create_transform
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import to_pil_image

from moevit.config.schema import ImageNetTransforms


class OnSampleImage:
    """Applies a PIL-to-tensor transform to a sample dict's ``"image"``; the other entries (label, key,
    num_skipped, ...) pass through. Module-level so DataLoader workers can pickle it."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"classification transform of sample {sample.get('key')!r}: expected a uint8 RGB image "
                f"(3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        return {**sample, "image": tv_tensors.Image(self.transform(to_pil_image(image)))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def timm_transform(
    train: bool,
    image_size: int,
    settings: ImageNetTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable:
    """timm's PIL -> normalized float tensor transform for these settings."""
    common = {"interpolation": settings.interpolation, "mean": tuple(mean), "std": tuple(std)}
    if not train:
        return create_transform(image_size, is_training=False, crop_pct=settings.crop_pct, **common)
    return create_transform(
        image_size,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=settings.hflip,
        # None, not 0: timm adds a ColorJitter for any number, and a zero one would still draw a permutation.
        color_jitter=settings.color_jitter or None,
        auto_augment=settings.auto_augment,
        re_prob=settings.re_prob,
        re_mode=settings.re_mode,
        re_count=settings.re_count,
        **common,
    )


def build(
    train: bool,
    image_size: int,
    settings: ImageNetTransforms,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[dict], dict]:
    """The sample-dict transform: timm's pipeline on the image, ending in a float32 normalized image."""
    return OnSampleImage(timm_transform(train, image_size, settings, crop_scale, mean, std))
