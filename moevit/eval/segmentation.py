"""Semantic segmentation mIoU and aAcc as mmsegmentation's ``IoUMetric`` defines them.

mmseg (``mmseg/evaluation/metrics/iou_metric.py``): per image, pixels labelled ``ignore_index`` (255)
are dropped, then per class c the areas |pred = c and label = c| (intersection), |pred = c| and
|label = c| are counted. These areas are summed over the WHOLE dataset before any division:

    IoU_c = total_intersect_c / total_union_c,   union = pred + label - intersect
    mIoU  = nanmean_c IoU_c     (a class with union 0 gives 0/0 = NaN and is left out; a class never
                                 labelled but predicted has IoU 0 and counts)
    aAcc  = sum_c total_intersect_c / sum_c total_label_c

The areas are counted at each image's ORIGINAL resolution (mmseg's test protocol): ``update`` takes
one logits map per image at its original mask size (``moevit.eval.segmentation_inference`` resizes
them back) and refuses any other size. This is not the mean of per-image IoUs. Each sample's record is its three integer area histograms
(bincount), so totals are exact sums whatever the merge order, and repeated samples are dropped
(moevit.eval.distributed). mmseg reports percentages; these are fractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from moevit.config.labels import IGNORE_INDEX
from moevit.eval.distributed import DedupedMetric, sample_ids


def area_histograms(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int
) -> np.ndarray:
    """(3, C) int64: per class, the intersection, predicted and labelled areas of one image's non-ignored pixels."""
    valid = label != ignore_index
    pred, label = pred[valid], label[valid]
    intersect = label[pred == label]
    return np.stack(
        [torch.bincount(values, minlength=num_classes).cpu().numpy() for values in (intersect, pred, label)]
    ).astype(np.int64)


class SegmentationMetric(DedupedMetric):
    """mIoU and aAcc ``{"mIoU": ..., "aAcc": ...}`` as fractions, summed over the dataset (mmseg's).

    Args:
        num_classes: classes C; labels are 0..C-1 or ``ignore_index``.
        ignore_index: label of pixels left out of every count.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def update(self, logits: torch.Tensor | Sequence[torch.Tensor], batch: Mapping[str, Any]) -> None:
        """Records the batch's images, identified by ``batch["keys"]``.

        Args:
            logits: per image, (C, H, W) class scores at that image's ORIGINAL mask size: a list, or one
                (B, C, H, W) tensor when every mask has the same size.
            batch: a segmentation batch with ``"masks"`` (B, H, W) int and ``"keys"``; with
                ``"mask_sizes"`` (B, 2) the masks are padded and image i's is ``masks[i, :h_i, :w_i]``.
        """
        if "masks" not in batch:
            raise KeyError(f"SegmentationMetric: the batch has no 'masks' entry (it has {sorted(batch)})")
        masks = batch["masks"]
        if masks.ndim != 3:
            raise ValueError(f"SegmentationMetric: expected masks (B, H, W), got {tuple(masks.shape)}")
        sizes = batch.get("mask_sizes")
        sizes = [tuple(masks.shape[1:])] * len(masks) if sizes is None else [tuple(s) for s in sizes.tolist()]
        if len(logits) != len(masks):
            raise ValueError(f"SegmentationMetric: {len(logits)} logits for {len(masks)} masks")
        ids = sample_ids(batch, "keys", len(masks), "SegmentationMetric")
        records = []
        for index, (scores, mask, (height, width)) in enumerate(zip(logits, masks, sizes)):
            if scores.ndim != 3 or scores.shape[0] != self.num_classes:
                raise ValueError(
                    f"SegmentationMetric: expected logits ({self.num_classes}, H, W) per image, "
                    f"got {tuple(scores.shape)} for image {index}"
                )
            if tuple(scores.shape[1:]) != (height, width):
                raise ValueError(
                    f"SegmentationMetric: the mask of image {index} (original size {(height, width)}) does not "
                    f"match its logits {tuple(scores.shape[1:])}; resize the logits to the original mask first"
                )
            label = mask[:height, :width].to(scores.device).long()
            labelled = label[label != self.ignore_index]
            if labelled.numel() and (labelled.min() < 0 or labelled.max() >= self.num_classes):
                raise ValueError(
                    f"SegmentationMetric: mask values must lie in [0, {self.num_classes}) or be "
                    f"{self.ignore_index}, got min {labelled.min().item()} max {labelled.max().item()}"
                )
            records.append(area_histograms(scores.argmax(dim=0), label, self.num_classes, self.ignore_index))
        self._add(ids, records)

    def total_areas(self) -> np.ndarray:
        """(3, C) int64: intersection, predicted and labelled areas per class, summed over the samples."""
        self._check_not_empty()
        return np.sum(list(self._records.values()), axis=0)

    def per_class_iou(self) -> np.ndarray:
        """(C,) float: IoU per class, NaN where the class was neither labelled nor predicted."""
        intersect, pred, label = self.total_areas()
        union = pred + label - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            return intersect / union

    def compute(self) -> dict[str, float]:
        """mIoU and aAcc; NaN where nothing was labelled (as mmseg: every ratio is 0/0)."""
        intersect, _, label = self.total_areas()
        iou = self.per_class_iou()
        with np.errstate(divide="ignore", invalid="ignore"):
            all_accuracy = intersect.sum() / label.sum()
        mean_iou = float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
        return {"mIoU": mean_iou, "aAcc": float(all_accuracy)}
