"""Top-k accuracy (ImageNet top-1 and top-5) over distinct samples.

A sample is a top-k hit when its label is among the k largest logits, as timm's ``accuracy``
computes it with ``torch.topk``. k is capped at the number of classes C (with C < 5, "top5" is the
share of samples whose label is among all C classes, i.e. 1). Each sample's record is the position
of its label in the top-``max(k)`` list (``max(k)`` when absent), so every k is answered from one
record and repeated samples are dropped (moevit.eval.distributed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moevit.eval.distributed import DedupedMetric, sample_ids


class ClassificationMetric(DedupedMetric):
    """Top-k accuracies ``{"top1": ..., "top5": ...}`` as fractions in [0, 1].

    Args:
        topk: the k of each reported accuracy; the metric names are ``f"top{k}"``.
    """

    def __init__(self, topk: Sequence[int] = (1, 5)) -> None:
        super().__init__()
        if not topk or any(k < 1 for k in topk):
            raise ValueError(f"topk must be a non-empty list of values >= 1, got {list(topk)}")
        self.topk = tuple(topk)

    def update(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Records the batch's samples, identified by ``batch["keys"]``.

        Args:
            logits: (B, C) class scores.
            batch: a classification batch with ``"labels"`` (B,) int64 in [0, C) and ``"keys"``.
        """
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"ClassificationMetric: expected logits of shape (B, C), got {shape}")
        if "labels" not in batch:
            raise KeyError(f"ClassificationMetric: the batch has no 'labels' entry (it has {sorted(batch)})")
        labels = batch["labels"].to(logits.device)
        num_samples, num_classes = logits.shape
        if labels.shape != (num_samples,):
            raise ValueError(
                f"ClassificationMetric: {num_samples} rows of logits but labels of shape {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"ClassificationMetric: labels must lie in [0, {num_classes}), "
                f"got min {labels.min().item()} max {labels.max().item()}"
            )
        ids = sample_ids(batch, "keys", num_samples, "ClassificationMetric")
        depth = min(max(self.topk), num_classes)
        hits = logits.topk(depth, dim=1).indices == labels[:, None]  # (B, depth), at most one True per row
        # argmax of a row without a hit is 0; depth marks "not in the list".
        positions = torch.where(hits.any(dim=1), hits.int().argmax(dim=1), depth)
        self._add(ids, positions.tolist())

    def compute(self) -> dict[str, float]:
        self._check_not_empty()
        positions = torch.tensor(list(self._records.values()))
        return {f"top{k}": (positions < k).double().mean().item() for k in self.topk}
