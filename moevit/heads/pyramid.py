"""Multi-scale feature maps from a plain (single-stride) ViT, for the dense heads.

A ViT keeps one stride (the patch size p) in every block; detectors and segmenters want a pyramid.
Two recipes, both rescaling stride-p maps with transposed convolutions (up), identity, or max pooling
(down):

- `SimpleFeaturePyramid` (ViTDet, Li et al. ECCV 2022, "Exploring Plain Vision Transformer Backbones
  for Object Detection", Fig. 2c / detectron2's `SimpleFeaturePyramid`): every level is built from the
  LAST block's map only, then a 1x1 and a 3x3 convolution, each followed by LayerNorm, bring it to a
  common width. It returns an OrderedDict of maps, which is what torchvision detectors expect from
  a backbone with an `out_channels` attribute.
- `MultiLevelNeck` (BEiT's ViT-UperNet, Bao et al. ICLR 2022, as in mmsegmentation's BEiT config):
  each of several blocks' maps gets its own scale (e.g. blocks 3/6/9/12 to strides p/4, p/2, p, 2p),
  keeping the ViT's width, for a decoder that wants features from different depths.

Scales are powers of two: a scale of 2**k > 1 is k stride-2 transposed convolutions (LayerNorm and
GELU between them), 2**-k is k stride-2 max pools.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn


def _scale_exponent(scale: float) -> int:
    exponent = math.log2(scale) if scale > 0 else float("nan")
    if not math.isfinite(exponent) or exponent != round(exponent):
        raise ValueError(f"feature scale {scale} is not a power of two (e.g. 4.0, 2.0, 1.0, 0.5)")
    return round(exponent)


def rescale_layers(channels: int, scale: float, halve_channels: bool) -> tuple[nn.Sequential, int]:
    """Layers that resample a (B, channels, h, w) map by `scale`, and their output width.

    Args:
        channels: input width.
        scale: output size / input size, a power of two.
        halve_channels: halve the width at each upsampling step (ViTDet) instead of keeping it (BEiT).
    """
    exponent = _scale_exponent(scale)
    layers: list[nn.Module] = []
    width = channels
    for step in range(exponent):
        out_width = width // 2 if halve_channels else width
        if out_width < 1 or (halve_channels and width % 2):
            raise ValueError(f"cannot halve {channels} channels {exponent} times for scale {scale}")
        if step > 0:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, out_width, kernel_size=2, stride=2))
        width = out_width
    layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-exponent)]
    return nn.Sequential(*layers), width


def _check_map(name: str, feature_map: torch.Tensor, channels: int) -> None:
    if feature_map.ndim != 4 or feature_map.shape[1] != channels:
        raise ValueError(f"{name} expects (B, {channels}, h, w) feature maps, got {tuple(feature_map.shape)}")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: maps at several strides from the last ViT map.

    Args:
        embed_dim: width D of the ViT map.
        out_channels: width of every output map (torchvision detectors read `self.out_channels`).
        scales: output scale of each level relative to the input map (4.0 = stride p/4).
        extra_levels: coarser levels appended after the last one, each a stride-2 subsampling of the
            previous level (ViTDet's / torchvision's `LastLevelMaxPool`, the P6 of detectors that
            want one more level than the four built from the ViT).
    """

    def __init__(
        self,
        embed_dim: int,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        extra_levels: int = 0,
    ):
        super().__init__()
        if not scales:
            raise ValueError("SimpleFeaturePyramid needs at least one scale")
        if extra_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {extra_levels}")
        self.embed_dim = embed_dim
        self.out_channels = out_channels
        self.extra_levels = extra_levels
        self.scales = [*scales, *(min(scales) / 2 ** (k + 1) for k in range(extra_levels))]
        self.levels = nn.ModuleList()
        for scale in scales:
            resample, width = rescale_layers(embed_dim, scale, halve_channels=True)
            # Bias-free convolutions: the LayerNorm after each one has its own shift.
            self.levels.append(
                nn.Sequential(
                    *resample,
                    nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def forward(self, feature_map: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Maps "0", "1", ... from finest to coarsest, for a (B, D, h, w) ViT map."""
        _check_map("SimpleFeaturePyramid", feature_map, self.embed_dim)
        maps = [level(feature_map) for level in self.levels]
        for _ in range(self.extra_levels):
            # kernel 1, stride 2: detectron2's LastLevelMaxPool, a plain subsampling.
            maps.append(nn.functional.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class MultiLevelNeck(nn.Module):
    """BEiT's ViT-to-UperNet neck: the i-th input map resampled by the i-th scale, width kept.

    Args:
        embed_dim: width D of every input map.
        scales: one output scale per input map (e.g. 4.0, 2.0, 1.0, 0.5 for four blocks).
    """

    def __init__(self, embed_dim: int, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        if not scales:
            raise ValueError("MultiLevelNeck needs at least one scale")
        self.embed_dim = embed_dim
        self.scales = list(scales)
        self.levels = nn.ModuleList(
            rescale_layers(embed_dim, scale, halve_channels=False)[0] for scale in scales
        )

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.levels):
            raise ValueError(
                f"MultiLevelNeck expects {len(self.levels)} feature maps, got {len(feature_maps)}"
            )
        for feature_map in feature_maps:
            _check_map("MultiLevelNeck", feature_map, self.embed_dim)
        return [level(feature_map) for level, feature_map in zip(self.levels, feature_maps)]
