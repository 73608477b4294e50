"""Any mmsegmentation decode head on the ViT's multi-level features (the optional `mmseg` extra).

Install: see the `mmseg` extra in pyproject.toml (mmsegmentation 1.x needs mmcv with compiled ops).
mmsegmentation is imported inside `build_mmseg_decode_head` only, so nothing here needs it until a
config selects an mmseg head. The ViT maps go through the same BEiT neck as `UperNetHead`
(`pyramid.MultiLevelNeck`), then into the mmseg head's `forward` (a list of multi-scale maps, as
mmseg's backbones + necks produce). Training uses the head's own `loss_by_feat`, so the config's
`loss_decode` (and `sampler`) apply; keys containing "loss" are summed into "loss", as mmengine's
`parse_losses` does, and mmseg's "acc_seg" is dropped (a metric, not a loss).

No mmcv build fits the pinned torch, so the real mmsegmentation is never exercised by this
repository's tests: tests/unit/test_mmseg_adapter.py runs this adapter's own logic against a stand-in
`mmseg` with the same interface, and tests/unit/test_heads.py the ImportError raised without the extra.
Written against mmsegmentation 1.2.2's
`BaseDecodeHead` (`forward(inputs)`, `loss_by_feat(seg_logits, data_samples)`, `align_corners`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moevit.heads.checks import batch_entry, requested_maps
from moevit.heads.pyramid import MultiLevelNeck
from moevit.models.moe_vit import BackboneOutput

INSTALL_HINT = (
    "mmsegmentation is not installed; it is the optional `mmseg` extra: "
    'pip install "setuptools<70" && pip install --no-build-isolation "mmcv==2.1.0" && pip install -e ".[mmseg]"'
)


def build_mmseg_decode_head(config: Mapping[str, Any]) -> nn.Module:
    """Builds an mmsegmentation decode head from its config dict, e.g. {"type": "UPerHead", ...}."""
    try:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    if "type" not in config:
        raise ValueError(
            f"an mmseg decode head config needs a 'type' (e.g. 'UPerHead'), got keys {sorted(config)}"
        )
    register_all_modules(init_default_scope=True)
    head = MODELS.build(dict(config))
    head.init_weights()  # applies the config's init_cfg (mmengine modules do not at construction)
    return head


class MMSegDecodeHead(nn.Module):
    """Four ViT blocks -> BEiT neck -> an mmsegmentation decode head -> logits at the input resolution.

    Args:
        embed_dim: width D of the ViT maps.
        num_classes: classes C (label 255 is ignored, mmseg's default `ignore_index`).
        in_indices: backbone blocks feeding the neck, strictly increasing.
        decode_head: the mmseg config dict of the head. `num_classes`, `in_channels` (D per level)
            and `in_index` (every level) are filled in when absent.
        scales: the neck's resampling of each block's map (strides p/4 .. 2p by default).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        in_indices: Sequence[int],
        decode_head: Mapping[str, Any],
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    ):
        super().__init__()
        if len(in_indices) != len(scales):
            raise ValueError(
                f"in_indices {list(in_indices)} and scales {list(scales)} must pair up one to one"
            )
        config = dict(decode_head)
        if config.setdefault("num_classes", num_classes) != num_classes:
            raise ValueError(
                f"decode_head.num_classes={config['num_classes']} but the task has {num_classes} classes"
            )
        in_index = config.setdefault("in_index", list(range(len(scales))))
        config.setdefault(
            "in_channels", embed_dim if isinstance(in_index, int) else [embed_dim] * len(in_index)
        )
        self.num_classes = num_classes
        self.feature_indices = list(in_indices)
        self.neck = MultiLevelNeck(embed_dim, scales)
        self.decode_head = build_mmseg_decode_head(config)

    def forward(self, feature_maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Logits (B, C, *image_size)."""
        logits = self.decode_head(self.neck(feature_maps))
        return F.interpolate(
            logits, size=tuple(image_size), mode="bilinear", align_corners=self.decode_head.align_corners
        )

    def forward_loss(self, backbone_out: BackboneOutput, batch: dict) -> dict[str, torch.Tensor]:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        maps = requested_maps(backbone_out, self.feature_indices, "MMSegDecodeHead")
        masks = batch_entry(batch, "masks", "MMSegDecodeHead")
        samples = [SegDataSample(gt_sem_seg=PixelData(data=mask[None])) for mask in masks]
        # loss_by_feat resizes the head's logits to the masks itself, with the head's align_corners.
        losses = self.decode_head.loss_by_feat(self.decode_head(self.neck(maps)), samples)
        parts = {name: value for name, value in losses.items() if "loss" in name}
        return {"loss": sum(parts.values()), **parts}

    def predict(self, backbone_out: BackboneOutput, batch: dict) -> torch.Tensor:
        """Logits (B, C, H, W) at the input images' resolution."""
        maps = requested_maps(backbone_out, self.feature_indices, "MMSegDecodeHead")
        return self(maps, batch_entry(batch, "images", "MMSegDecodeHead").shape[-2:])
