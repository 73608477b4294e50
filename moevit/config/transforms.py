"""Per-format transform settings, part of the schema (moevit.config.schema re-exports them).

`tasks.<name>.data.transforms` is a mapping that each dataset format reads as its own class here
(unknown keys and wrong types are errors, as everywhere). The defaults keep a section that is left out at
the plain pipeline the demo trains with; the paper configs (configs/paper/) turn on the published recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ImageNetTransforms:
    """Classification: timm's `create_transform` (train and eval) and timm's `Mixup` (moevit.data.mixup).

    Left out, training is RandomResizedCrop (`crop_scale`) and a flip, with hard labels. Label smoothing
    is set here only: it builds the training targets (timm's `Mixup` with mixing on, timm's
    `mixup_target` at lam 1 without), and the classification head's loss never smooths again."""

    hflip: float = 0.5  # probability of a horizontal flip
    # timm's brightness/contrast/saturation strength; timm turns it off under auto_augment (as DeiT does)
    color_jitter: float = 0.0
    auto_augment: str | None = None  # timm's policy string, e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # train crop, RandAugment and eval resize
    re_prob: float = 0.0  # random erasing probability
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = 1
    crop_pct: float = 0.875  # eval: resize the shorter side to image_size / crop_pct, center-crop image_size
    mixup_alpha: float = 0.0  # 0 with cutmix_alpha 0: no mixing
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on
    label_smoothing: float = 0.0

    @property
    def mixes(self) -> bool:
        """Whether training batches go through timm's Mixup (mixup or cutmix on)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def validate(self) -> None:
        for name in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        for name in ("color_jitter", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.re_count < 1:
            raise ValueError(f"re_count must be >= 1, got {self.re_count}")
        if self.auto_augment is not None:
            _check_timm_policy(self.auto_augment, self.interpolation)


def _check_timm_policy(policy: str, interpolation: str) -> None:
    """Refuses an auto_augment string timm cannot parse, at config time rather than in a DataLoader worker.
    timm's own parser decides (its create_transform builds the policy); it reports errors by assert."""
    from timm.data import create_transform  # here: only configs that name a policy pay for the import

    try:
        create_transform(8, is_training=True, auto_augment=policy, interpolation=interpolation)
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        detail = f": {err}" if str(err) else ""
        raise ValueError(
            f"auto_augment {policy!r} is not a timm policy string{detail} "
            "(e.g. 'rand-m9-mstd0.5-inc1', 'original', 'augmix-m5-w4-d2')"
        ) from None


@dataclass
class CocoTransforms:
    """Detection: ViTDet's large-scale jitter for training; eval resizes the longest side to image_size.

    Every image keeps its aspect ratio and is padded (bottom/right) to the image_size square; the batch
    carries each image's valid extent and its scale from the original pixels."""

    scale_range: tuple[float, float] = (1.0, 1.0)  # LSJ's random resize of the target size (ViTDet: 0.1, 2.0)
    hflip: float = 0.5

    def validate(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {list(self.scale_range)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be in [0, 1], got {self.hflip}")


@dataclass
class Ade20kTransforms:
    """Segmentation: mmsegmentation's ADE20K pipeline and its whole/slide inference at the original size.

    Train: RandomResize of `scale` by a ratio in `ratio_range` (keeping the aspect ratio), a random
    image_size crop (retried while one class covers more than `cat_max_ratio`), flip, and optionally
    mmseg's PhotoMetricDistortion, then padding to the image_size square. Eval: resize to fit `scale`,
    infer (`whole`, or `slide` windows of image_size at `slide_stride`), and resize the logits to the
    original mask before the metric. docs/data.md, "ADE20K protocol"."""

    scale: tuple[int, int] | None = (
        None  # (long, short) bound; None: (4, 1) x image_size, mmseg's (2048, 512)
    )
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 1.0  # mmseg's ADE20K: 0.75; 1 turns the retries off
    hflip: float = 0.5
    photometric_distortion: bool = False  # mmseg's ADE20K: on
    eval_mode: Literal["whole", "slide"] = "whole"
    slide_stride: int | None = None  # None: two thirds of image_size, mmseg's 341 for 512

    def validate(self) -> None:
        if self.scale is not None and min(self.scale) < 1:
            raise ValueError(f"scale must be positive, got {list(self.scale)}")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {list(self.ratio_range)}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be in [0, 1], got {self.hflip}")
        if self.slide_stride is not None and self.slide_stride < 1:
            raise ValueError(f"slide_stride must be >= 1, got {self.slide_stride}")


FORMAT_TRANSFORMS: dict[str, type] = {
    "imagenet": ImageNetTransforms,
    "coco": CocoTransforms,
    "ade20k": Ade20kTransforms,
}
