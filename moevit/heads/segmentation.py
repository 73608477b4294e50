"""Semantic segmentation head: UperNet (Xiao et al. ECCV 2018) on four ViT blocks, in plain torch.

As BEiT's ViT-UperNet (Bao et al. ICLR 2022; mmsegmentation's `UPerHead` with the BEiT neck):
1. four blocks' maps, all at stride p, are resampled to strides p/4, p/2, p and 2p
   (`pyramid.MultiLevelNeck`: transposed convolutions, identity, max pooling);
2. a pyramid pooling module (PSPNet, Zhao et al. 2017) summarises the coarsest map at 1x1, 2x2,
   3x3 and 6x6 and fuses it back;
3. an FPN (Lin et al. 2017) adds each coarser level into the next finer one (lateral 1x1, top-down
   bilinear upsampling, 3x3 smoothing);
4. all levels are upsampled to the finest, concatenated, fused, and classified per pixel;
5. the logits are upsampled bilinearly to the input resolution.

Normalisation is GroupNorm where mmsegmentation uses (Sync)BatchNorm: it does not depend on the
batch, so tiny per-process batches, the 1x1 pooled branch and evaluation all behave the same.

Loss: cross-entropy averaged over the pixels that are not ignored (label 255). This is torch's
`ignore_index` mean and mmsegmentation's `avg_non_ignore=True`. A batch whose pixels are all
ignored gives a loss of exactly 0 (with zero gradients) rather than torch's 0/0 = NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

from moevit.config.labels import IGNORE_INDEX
from moevit.heads.checks import batch_entry, requested_maps
from moevit.heads.pyramid import MultiLevelNeck
from moevit.models.moe_vit import BackboneOutput


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest power-of-two divisor of `num_channels` below that, with
    at least two channels per group: the pyramid pooling's 1x1 branch normalises a single pixel, where
    a one-channel group has no variance (a 32-channel decoder failed there in training)."""
    groups = math.gcd(32, num_channels)
    if num_channels // groups < 2 and num_channels > 1:
        groups = math.gcd(32, num_channels // 2)
    return nn.GroupNorm(groups, num_channels)


ConvNormReLU = partial(Conv2dNormActivation, norm_layer=group_norm, activation_layer=nn.ReLU)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, where: str) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 when every pixel is ignored.

    Args:
        logits: (B, C, H, W) scores.
        masks: (B, H, W) int64 labels in [0, C) or 255 (ignored).
        where: the caller's name, for error messages.
    """
    num_classes = logits.shape[1]
    if masks.dtype != torch.int64 or masks.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"{where}: masks must be int64 {(logits.shape[0], *logits.shape[2:])} to match the logits, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    valid = masks != IGNORE_INDEX
    invalid = valid & ((masks < 0) | (masks >= num_classes))
    if invalid.any():
        found = masks[invalid].unique()[:10].tolist()
        raise ValueError(
            f"{where}: mask values must lie in [0, {num_classes}) or be {IGNORE_INDEX}, found {found}"
        )
    # float32: a bf16 sum over a batch of pixels would round away most of each pixel's term.
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / valid.sum().clamp(min=1)


class UperNetHead(nn.Module):
    """UperNet decoder on four ViT blocks -> per-pixel logits at the input resolution.

    Args:
        embed_dim: width D of the ViT maps.
        num_classes: classes C (label 255 is ignored).
        in_indices: the backbone blocks whose outputs feed the decoder, strictly increasing
            (the order in which the backbone returns them); e.g. 2, 5, 8, 11 for a 12-block ViT.
        scales: resampling of each block's map (4, 2, 1, 0.5: strides p/4, p/2, p, 2p as in BEiT).
        channels: width of the decoder (mmsegmentation uses 512 for ViT-B, 768 for BEiT).
        pool_scales: output sizes of the pyramid pooling module's average pools.
        dropout: dropout before the per-pixel classifier (mmsegmentation: 0.1).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        in_indices: Sequence[int],
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(in_indices) != len(scales):
            raise ValueError(
                f"in_indices {list(in_indices)} and scales {list(scales)} must pair up one to one"
            )
        if any(b <= a for a, b in zip(in_indices, in_indices[1:])) or min(in_indices) < 0:
            raise ValueError(
                f"in_indices must be non-negative and strictly increasing, got {list(in_indices)}"
            )
        if list(scales) != sorted(scales, reverse=True):
            raise ValueError(f"scales must go from finest to coarsest (decreasing), got {list(scales)}")
        self.num_classes = num_classes
        self.feature_indices = list(in_indices)
        self.neck = MultiLevelNeck(embed_dim, scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), ConvNormReLU(embed_dim, channels, kernel_size=1))
            for size in pool_scales
        )
        self.ppm_bottleneck = ConvNormReLU(embed_dim + len(pool_scales) * channels, channels, kernel_size=3)
        # The coarsest level's lateral is the PPM output; the others get a 1x1 lateral and a 3x3 smoother.
        self.lateral_convs = nn.ModuleList(
            ConvNormReLU(embed_dim, channels, kernel_size=1) for _ in scales[:-1]
        )
        self.fpn_convs = nn.ModuleList(ConvNormReLU(channels, channels, kernel_size=3) for _ in scales[:-1])
        self.fpn_bottleneck = ConvNormReLU(len(scales) * channels, channels, kernel_size=3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def _pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [
            F.interpolate(branch(x), size=x.shape[2:], mode="bilinear", align_corners=False)
            for branch in self.ppm
        ]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feature_maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Logits (B, C, *image_size) from one (B, D, h, w) map per entry of `in_indices`."""
        levels = self.neck(feature_maps)
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, levels)]
        laterals.append(self._pyramid_pooling(levels[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False
            )
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        finest = outputs[0].shape[2:]
        outputs = [outputs[0]] + [
            F.interpolate(o, size=finest, mode="bilinear", align_corners=False) for o in outputs[1:]
        ]
        logits = self.classifier(self.dropout(self.fpn_bottleneck(torch.cat(outputs, dim=1))))
        return F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, masks, "UperNetHead.loss")

    def forward_loss(self, backbone_out: BackboneOutput, batch: dict) -> dict[str, torch.Tensor]:
        maps = requested_maps(backbone_out, self.feature_indices, "UperNetHead")
        images = batch_entry(batch, "images", "UperNetHead")
        logits = self(maps, images.shape[-2:])
        return {"loss": self.loss(logits, batch_entry(batch, "masks", "UperNetHead"))}

    def predict(self, backbone_out: BackboneOutput, batch: dict) -> torch.Tensor:
        """Logits (B, C, H, W) at the input images' resolution; argmax over C gives the label map."""
        maps = requested_maps(backbone_out, self.feature_indices, "UperNetHead")
        return self(maps, batch_entry(batch, "images", "UperNetHead").shape[-2:])
