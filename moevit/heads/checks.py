"""Input checks shared by the heads: clear errors, naming what and where, before compute starts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moevit.models.moe_vit import BackboneOutput


def batch_entry(batch: dict, key: str, where: str):
    """`batch[key]`, or a KeyError that lists what the batch holds."""
    if key not in batch:
        raise KeyError(f"{where}: the batch has no {key!r} entry (it has {sorted(batch)})")
    return batch[key]


def check_class_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raises ValueError unless `labels` is an int64 vector with values in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        layout = (
            f"{labels.dtype} {tuple(labels.shape)}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise ValueError(f"{where}: expected int64 labels of shape (N,), got {layout}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), got min {labels.min().item()} max {labels.max().item()}"
        )


def check_soft_targets(targets: torch.Tensor, batch_size: int, num_classes: int, where: str) -> None:
    """Raises ValueError unless `targets` is a float (batch_size, num_classes) matrix whose rows are
    distributions (non-negative, summing to 1), as Mixup and label smoothing make them."""
    if targets.shape != (batch_size, num_classes):
        raise ValueError(
            f"{where}: expected soft targets of shape ({batch_size}, {num_classes}), got {tuple(targets.shape)}"
        )
    if targets.numel() and (
        targets.min() < 0 or not torch.allclose(targets.sum(dim=1), targets.new_ones(batch_size), atol=1e-3)
    ):
        raise ValueError(f"{where}: soft targets must be non-negative rows summing to 1")


def requested_maps(
    backbone_out: BackboneOutput, feature_indices: Sequence[int], where: str
) -> list[torch.Tensor]:
    """The backbone's intermediate maps, checked to be one per requested block."""
    if len(backbone_out.intermediates) != len(feature_indices):
        raise ValueError(
            f"{where} needs the maps of blocks {list(feature_indices)}, but the backbone returned "
            f"{len(backbone_out.intermediates)}; call forward_backbone(..., intermediate_indices=head.feature_indices)"
        )
    return backbone_out.intermediates
