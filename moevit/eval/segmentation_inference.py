"""Segmentation inference at the original resolution: mmsegmentation's ``whole`` and ``slide`` test modes.

The eval transform (``moevit.data.transforms.segmentation``) resizes each image to fit the configured
scale and keeps its mask at the original size; the collated batch pads both and carries
``image_sizes`` and ``mask_sizes``. Here each image is cut into windows of its valid (resized) extent:

- ``whole``: one window, the whole image;
- ``slide``: mmseg's grid of ``crop`` x ``crop`` windows at ``stride``:
  ``grids = max(side - crop + stride - 1, 0) // stride + 1`` per axis, window k starting at
  ``k * stride``, shifted back to end at the image's edge, smaller than ``crop`` where the image is.

A window's logits are the model's on the window padded with 0 at the bottom / right to a multiple of
the patch size (as mmseg's ViT pads its input), cropped back. Overlapping windows are summed and
divided by the per-pixel count, and the result is resized bilinearly (``align_corners=False``) to the
image's original mask size, where the metric is computed (mmseg's ``postprocess_result``).

Windows of one padded shape are batched, at most ``max_batch`` to a forward, so ``whole`` runs one
forward per distinct image size (exactly what mmseg's batch-1 test computes, padding included).

Under expert parallelism every rank must run the same number of forwards, but the number of windows
depends on the images' sizes. So the ranks agree on the largest count (an all-reduce MAX, one per
batch, on every rank) and a rank with fewer runs throwaway forwards on a ``crop`` x ``crop`` zero
image, whose logits are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn import functional as F

from moevit.config.schema import Ade20kTransforms
from moevit.parallel.collectives import is_distributed

Window = tuple[int, int, int, int]  # y1, y2, x1, x2 in the resized image


@dataclass(frozen=True)
class SegmentationInference:
    """How to infer: ``mode``, the slide window ``crop`` and ``stride``, the ``size_divisor`` every model
    input is padded to (the patch size), and at most ``max_batch`` windows per forward."""

    mode: Literal["whole", "slide"]
    crop: int
    stride: int
    size_divisor: int = 1
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"segmentation eval_mode must be 'whole' or 'slide', got {self.mode!r}")
        for name in ("crop", "stride", "size_divisor", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"segmentation inference: {name} must be >= 1, got {getattr(self, name)}")
        if self.stride > self.crop:
            raise ValueError(
                f"slide_stride {self.stride} exceeds the window {self.crop}: pixels between windows "
                "would get no prediction"
            )

    @classmethod
    def from_settings(
        cls, settings: Ade20kTransforms, image_size: int, patch_size: int, batch_size: int
    ) -> SegmentationInference:
        """A task's inference: windows of its ``image_size`` (the training crop), its eval batch size."""
        stride = settings.slide_stride if settings.slide_stride is not None else default_stride(image_size)
        return cls(settings.eval_mode, image_size, stride, patch_size, batch_size)

    def windows(self, height: int, width: int) -> list[Window]:
        """The windows of a (height, width) image, row by row."""
        if self.mode == "whole":
            return [(0, height, 0, width)]
        return slide_windows(height, width, self.crop, self.stride)


def default_stride(image_size: int) -> int:
    """Two thirds of the window, rounded down: mmseg's 341 for 512."""
    return max(2 * image_size // 3, 1)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """mmseg's ``slide_inference`` grid: (y1, y2, x1, x2) of every window, row by row."""

    def spans(size: int) -> list[tuple[int, int]]:
        grids = max(size - crop + stride - 1, 0) // stride + 1
        ends = [min(index * stride + crop, size) for index in range(grids)]
        return [(max(end - crop, 0), end) for end in ends]

    return [(y1, y2, x1, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_forwards(
    windows: Sequence[Sequence[Window]], size_divisor: int, max_batch: int
) -> list[list[tuple[int, Window]]]:
    """The forwards: lists of (image index, window) of one padded shape, at most ``max_batch`` each,
    in order of first appearance."""
    groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for index, image_windows in enumerate(windows):
        for window in image_windows:
            y1, y2, x1, x2 = window
            shape = (_round_up(y2 - y1, size_divisor), _round_up(x2 - x1, size_divisor))
            groups.setdefault(shape, []).append((index, window))
    return [
        group[start : start + max_batch]
        for group in groups.values()
        for start in range(0, len(group), max_batch)
    ]


def agreed_forward_count(count: int, device: torch.device) -> int:
    """The largest ``count`` over all ranks (a collective: every rank calls it once per batch)."""
    if not is_distributed():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def _padded_crops(images: torch.Tensor, job: list[tuple[int, Window]], size_divisor: int) -> torch.Tensor:
    _, (y1, y2, x1, x2) = job[0]
    height, width = _round_up(y2 - y1, size_divisor), _round_up(x2 - x1, size_divisor)
    crops = []
    for index, (y1, y2, x1, x2) in job:
        crop = images[index, :, y1:y2, x1:x2]
        crops.append(F.pad(crop, [0, width - crop.shape[-1], 0, height - crop.shape[-2]], value=0.0))
    return torch.stack(crops)


def segment_batch(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    mask_sizes: torch.Tensor,
    inference: SegmentationInference,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Per image, (C, H, W) float32 logits at its original mask size.

    Every rank of the job must call it once per batch (it agrees on the forward count).

    Args:
        predict: (N, 3, h, w) images -> (N, C, h, w) logits at the input size (``model.predict``).
        images: (B, 3, H, W) resized images, padded at the bottom / right.
        image_sizes: (B, 2) each image's valid (height, width) in ``images``.
        mask_sizes: (B, 2) each image's original (height, width), the size of its logits here.
        inference: mode, windows and batching.
        dtype: the model inputs are cast to it (None: kept).
    """
    sizes = [tuple(size) for size in image_sizes.tolist()]
    if len(sizes) != len(images) or len(mask_sizes) != len(images):
        raise ValueError(
            f"segment_batch: {len(images)} images, {len(sizes)} image_sizes and {len(mask_sizes)} mask_sizes"
        )
    for height, width in sizes:
        if not (0 < height <= images.shape[-2] and 0 < width <= images.shape[-1]):
            raise ValueError(
                f"segment_batch: image size {(height, width)} outside the batch {tuple(images.shape)}"
            )
    jobs = plan_forwards(
        [inference.windows(*size) for size in sizes], inference.size_divisor, inference.max_batch
    )
    forwards = agreed_forward_count(len(jobs), images.device)
    sums: list[torch.Tensor | None] = [None] * len(images)
    counts = [torch.zeros(1, *size, device=images.device) for size in sizes]
    for job in jobs:
        inputs = _padded_crops(images, job, inference.size_divisor)
        logits = predict(inputs if dtype is None else inputs.to(dtype))
        if logits.ndim != 4 or logits.shape[0] != len(job) or logits.shape[-2:] != inputs.shape[-2:]:
            raise ValueError(
                f"segmentation predict returned {tuple(logits.shape)} for inputs {tuple(inputs.shape)}; "
                "expected (N, C, H, W) logits at the input size"
            )
        for scores, (index, (y1, y2, x1, x2)) in zip(logits, job):
            if sums[index] is None:
                sums[index] = torch.zeros(scores.shape[0], *sizes[index], device=images.device)
            sums[index][:, y1:y2, x1:x2] += scores[:, : y2 - y1, : x2 - x1].float()
            counts[index][:, y1:y2, x1:x2] += 1
    throwaway = images.new_zeros(1, images.shape[1], inference.crop, inference.crop)
    for _ in range(forwards - len(jobs)):
        predict(throwaway if dtype is None else throwaway.to(dtype))
    return [
        F.interpolate((total / count)[None], size=tuple(original), mode="bilinear", align_corners=False)[0]
        for total, count, original in zip(sums, counts, mask_sizes.tolist())
    ]
