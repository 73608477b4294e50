"""Task heads on the shared backbone, and `build_head`, which builds one from a task type.

Every head offers the same small interface (`TaskHead`), so a training loop treats them alike:

    out = backbone.forward_backbone(images, task, head.feature_indices or ())
    losses = head.forward_loss(out, batch)     # {"loss": total, <named parts>...}
    predictions = head.predict(out, batch)     # logits (cls, seg) or detections (det)

Heads read only `BackboneOutput` (final tokens, requested block maps) and the batch dict of
moevit.data.collate; they hold no parallelism.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from moevit.heads.classification import ClassificationHead
from moevit.heads.detection import DetectionHead
from moevit.heads.mmseg_head import MMSegDecodeHead, build_mmseg_decode_head
from moevit.heads.pyramid import MultiLevelNeck, SimpleFeaturePyramid
from moevit.heads.segmentation import UperNetHead
from moevit.models.moe_vit import BackboneOutput, MoEViT

__all__ = [
    "ClassificationHead",
    "DetectionHead",
    "MMSegDecodeHead",
    "MultiLevelNeck",
    "SimpleFeaturePyramid",
    "TaskHead",
    "UperNetHead",
    "build_head",
    "build_mmseg_decode_head",
    "evenly_spaced_blocks",
]


@runtime_checkable
class TaskHead(Protocol):
    """What the training loop relies on.

    `feature_indices`: the backbone blocks whose maps the head reads (None: final tokens only).
    `forward_loss`: named losses; "loss" is the total to optimise.
    `predict`: classification logits (B, C); detections, one {"boxes", "scores", "labels"} per
    image in input pixels; segmentation logits (B, C, H, W) at the input resolution.
    """

    feature_indices: list[int] | None

    def forward_loss(self, backbone_out: BackboneOutput, batch: dict) -> dict[str, torch.Tensor]: ...

    def predict(self, backbone_out: BackboneOutput, batch: dict) -> Any: ...


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """`count` block indices ending at the last block, evenly spaced (2, 5, 8, 11 for 12 blocks)."""
    if depth < count:
        raise ValueError(f"cannot take {count} distinct blocks from a backbone of depth {depth}")
    return [depth * (k + 1) // count - 1 for k in range(count)]


def _construct(cls: type[nn.Module], given: dict, options: dict[str, Any]) -> nn.Module:
    """cls(**given, **options), rejecting options the constructor does not take with a clear message."""
    accepted = set(inspect.signature(cls).parameters) - set(given)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{cls.__name__} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(**given, **options)


def build_head(task_type: str, num_classes: int, backbone: MoEViT, image_size: int, **options) -> nn.Module:
    """The head of a task, sized from the backbone.

    Args:
        task_type: "classification", "detection" or "segmentation".
        num_classes: classes of the task (contiguous labels 0..C-1).
        backbone: provides `embed_dim`, `patch_size`, `num_prefix_tokens` and its depth.
        image_size: the task's square input side; checked against the patch size and pyramid.
        options: constructor arguments of the head class (e.g. `pool`, `out_channels`, `channels`).
            Segmentation with `mmseg_decode_head={...}` builds `MMSegDecodeHead` on that config.
    """
    if image_size % backbone.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {backbone.patch_size}")
    depth = len(backbone.blocks)
    dims = {"embed_dim": backbone.embed_dim, "num_classes": num_classes}
    if task_type == "classification":
        pool = options.pop("pool", "token" if backbone.num_prefix_tokens else "avg")
        head = _construct(
            ClassificationHead,
            {**dims, "pool": pool, "num_prefix_tokens": backbone.num_prefix_tokens},
            options,
        )
    elif task_type == "detection":
        given = {**dims, "patch_size": backbone.patch_size, "feature_index": depth - 1}
        head = _construct(DetectionHead, given, options)
        _check_grid(image_size, head.strides, "detection")
    elif task_type == "segmentation":
        in_indices = options.pop("in_indices", None) or evenly_spaced_blocks(depth)
        if any(not 0 <= i < depth for i in in_indices):
            raise ValueError(
                f"segmentation in_indices {list(in_indices)} outside the backbone's {depth} blocks"
            )
        given = {**dims, "in_indices": in_indices}
        if "mmseg_decode_head" in options:
            given["decode_head"] = options.pop("mmseg_decode_head")
            head = _construct(MMSegDecodeHead, given, options)
        else:
            head = _construct(UperNetHead, given, options)
        _check_grid(image_size, [backbone.patch_size / s for s in head.neck.scales], "segmentation")
    else:
        raise ValueError(
            f"unknown task type {task_type!r}; expected classification, detection or segmentation"
        )
    return head


def _check_grid(image_size: int, strides: list[float], task_type: str) -> None:
    coarsest = max(strides)
    if image_size < coarsest:
        raise ValueError(
            f"{task_type} head: its coarsest level has stride {coarsest:g} px, more than the {image_size} px image"
        )
