"""Collate functions: lists of transformed sample dicts -> batch dicts, one function per task type.

Batches are plain tensors (tv_tensor wrappers removed) plus Python lists:

- classification: ``{"images": (B, 3, H, W) float, "labels": (B,) int64, "keys", "num_skipped"}``; for
  training with Mixup/CutMix or label smoothing, "labels" are (B, C) float targets (moevit.data.mixup)
- detection: ``{"images", "targets": [{"boxes": (N, 4) float XYXY in the transformed image's pixels,
  "labels": (N,) int64}, ...], "image_ids": list[int], "image_sizes", "original_sizes", "scales",
  "keys", "num_skipped"}``; each image sits in the top left of its padded canvas, and the per-image
  lists give its valid extent (h, w) there (torchvision's ``ImageList.image_sizes``), its original
  (H, W) and its resize factors (height, width) (see moevit.data.transforms.detection)
- segmentation: ``{"images", "image_sizes", "masks": (B, H, W) int64 (255 = ignore), "mask_sizes", "keys",
  "num_skipped"}``; images and masks of different sizes (evaluation keeps each image at its own resized
  size and each mask at its original size) are padded at the bottom / right, images with 0 and masks
  with 255, and ``image_sizes`` / ``mask_sizes`` (B, 2) int64 hold each one's valid (height, width)

``num_skipped`` sums the samples' ``"num_skipped"`` (set by ``SkipCorrupt``; 0 when absent): the number
of corrupt samples passed over to fill this batch, carried out of the DataLoader workers this way.
The functions are module-level so DataLoader workers can pickle them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from moevit.config.labels import IGNORE_INDEX
from moevit.config.schema import Ade20kTransforms, CocoTransforms, ImageNetTransforms
from moevit.data.mixup import MixupCollate, needs_soft_targets


def _stack_images(samples: Sequence[dict]) -> torch.Tensor:
    shapes = {tuple(sample["image"].shape) for sample in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"cannot stack images of shapes {sorted(shapes)} (keys {[s.get('key') for s in samples]}); "
            "apply moevit.data.transforms.build_transforms first so every image has the same size"
        )
    return torch.stack([sample["image"].as_subclass(torch.Tensor) for sample in samples])


def _common(samples: Sequence[dict]) -> dict:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    return {
        "images": _stack_images(samples),
        "keys": [sample.get("key") for sample in samples],
        "num_skipped": sum(sample.get("num_skipped", 0) for sample in samples),
    }


def collate_classification(samples: Sequence[dict]) -> dict:
    batch = _common(samples)
    batch["labels"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.int64)
    return batch


def collate_detection(samples: Sequence[dict]) -> dict:
    batch = _common(samples)
    batch["targets"] = [
        {
            "boxes": sample["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": sample["labels"].to(torch.int64),
        }
        for sample in samples
    ]
    batch["image_ids"] = [int(sample["image_id"]) for sample in samples]
    for batch_key, sample_key in _DETECTION_GEOMETRY.items():
        batch[batch_key] = [_geometry_entry(sample, sample_key) for sample in samples]
    return batch


# batch key -> the sample key the detection transforms record it under
_DETECTION_GEOMETRY = {"image_sizes": "valid_size", "original_sizes": "original_size", "scales": "scale"}


def _geometry_entry(sample: dict, key: str) -> tuple:
    if key not in sample:
        raise KeyError(
            f"detection sample {sample.get('key')!r} has no {key!r}; "
            "apply moevit.data.transforms.build_transforms first (it records the image's geometry)"
        )
    return tuple(sample[key])


def _pad_stack(tensors: Sequence[torch.Tensor], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors (..., H_i, W_i) padded at the bottom / right to the largest size and stacked, and their
    (H_i, W_i) as a (B, 2) int64 tensor."""
    sizes = torch.tensor([tuple(tensor.shape[-2:]) for tensor in tensors], dtype=torch.int64)
    height, width = sizes.max(dim=0).values.tolist()
    padded = [
        torch.nn.functional.pad(
            tensor, [0, width - tensor.shape[-1], 0, height - tensor.shape[-2]], value=fill
        )
        for tensor in tensors
    ]
    return torch.stack(padded), sizes


def collate_segmentation(samples: Sequence[dict]) -> dict:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images, image_sizes = _pad_stack([sample["image"].as_subclass(torch.Tensor) for sample in samples], 0.0)
    masks, mask_sizes = _pad_stack(
        [sample["mask"].as_subclass(torch.Tensor) for sample in samples], IGNORE_INDEX
    )
    return {
        "images": images,
        "image_sizes": image_sizes,
        "masks": masks.to(torch.int64),
        "mask_sizes": mask_sizes,
        "keys": [sample.get("key") for sample in samples],
        "num_skipped": sum(sample.get("num_skipped", 0) for sample in samples),
    }


COLLATE_FUNCTIONS: dict[str, Callable[[Sequence[dict]], dict]] = {
    "classification": collate_classification,
    "detection": collate_detection,
    "segmentation": collate_segmentation,
}


def collate_for_task(
    task_type: str,
    train_settings: ImageNetTransforms | CocoTransforms | Ade20kTransforms | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Callable[[Sequence[dict]], dict]:
    """Returns the collate function of "classification", "detection" or "segmentation".

    Training passes the task's transform settings (`DatasetConfig.transform_settings()`), its
    `num_classes` and its mixing `seed`; only classification reads them: with Mixup/CutMix or label
    smoothing on, its labels become soft targets (moevit.data.mixup). Evaluation leaves them out and
    gets hard labels.
    """
    if task_type not in COLLATE_FUNCTIONS:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {sorted(COLLATE_FUNCTIONS)}")
    mixes = isinstance(train_settings, ImageNetTransforms) and needs_soft_targets(train_settings)
    if task_type == "classification" and mixes:
        if num_classes is None:
            raise ValueError("collate_for_task: soft classification targets need num_classes")
        return MixupCollate(collate_classification, train_settings, num_classes, seed)
    return COLLATE_FUNCTIONS[task_type]


def pins_memory(device: torch.device | str) -> bool:
    """Whether loaders feeding `device` should collate into page-locked host memory: only for CUDA, where
    a copy from pinned memory can run asynchronously (and at full bus speed); pinning needs CUDA."""
    return torch.device(device).type == "cuda"


def copies_asynchronously(device: torch.device | str) -> bool:
    """Whether `move_batch` copies with non_blocking=True: to CUDA only. A host-to-device copy from pinned
    memory then overlaps the work already queued, and later kernels on the stream still wait for it; a
    copy to the CPU must stay blocking, since the CPU would read the tensor before it had arrived."""
    return torch.device(device).type == "cuda"


def move_batch(batch: Mapping, device: torch.device) -> dict:
    """The tensors of a collated batch on `device`, nested ones (detection targets) included; other
    values unchanged. No casting: under bf16 the engine runs the forward in autocast. Copies to CUDA are
    non-blocking (`copies_asynchronously`)."""
    non_blocking = copies_asynchronously(device)

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, Mapping):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, list):
            return [move(item) for item in value]
        return value

    return move(batch)
