"""Training and evaluation transforms for the three tasks, on sample dicts.

A reader yields a sample dict whose image, boxes and mask are torchvision tv_tensors (``Image``,
``BoundingBoxes``, ``Mask``); a task's transform applies the same geometry to all of them and passes the
other entries (``label``, ``key``, ``image_id``, ``num_skipped``) through. Every pipeline ends in a
float32 image normalized with the ImageNet mean/std.

Each task type has its own module, which builds its whole pipeline from its format's settings
(``moevit.config.schema.FORMAT_TRANSFORMS``): classification.py (timm's ``create_transform``),
detection.py (ViTDet's large-scale jitter, torchvision v2) and segmentation.py (mmsegmentation's
ADE20K pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from moevit.config.schema import Ade20kTransforms, CocoTransforms, ImageNetTransforms
from moevit.data.transforms import classification, detection, segmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's (and timm's) area range

_BUILDERS = {
    "classification": (classification.build, ImageNetTransforms),
    "detection": (detection.build, CocoTransforms),
    "segmentation": (segmentation.build, Ade20kTransforms),
}


def build_transforms(
    task_type: str,
    train: bool,
    image_size: int,
    settings: ImageNetTransforms | CocoTransforms | Ade20kTransforms | None = None,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[dict], dict]:
    """Returns the transform applied to each sample dict of a ``task_type`` reader.

    Args:
        task_type: "classification", "detection" or "segmentation".
        train: random augmentation (True) or the deterministic evaluation transform (False).
        image_size: side of the square output image (crop, or padded canvas).
        settings: the format's transform settings (``DatasetConfig.transform_settings()``); None:
            the defaults of the task type's settings class.
        crop_scale: classification train only: range of the crop's share of the image area.
        mean: per-channel mean subtracted from the [0, 1] image.
        std: per-channel standard deviation the image is divided by.
    """
    if task_type not in _BUILDERS:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {sorted(_BUILDERS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    build, settings_class = _BUILDERS[task_type]
    if settings is None:
        settings = settings_class()
    elif not isinstance(settings, settings_class):
        raise TypeError(
            f"{task_type} transforms take {settings_class.__name__}, got {type(settings).__name__}"
        )
    return build(train, image_size, settings, tuple(crop_scale), mean, std)
