"""What a task head costs per image: activation bytes kept for the backward and forward multiply-adds.

Counted by walking the head's own layer stacks over the shapes of its main feature maps, so a change
of widths, scales or levels in the head's options shows up here without a second copy of them:

- bytes: each convolution saves its input (``c`` bytes per element at the compute precision), each
  normalisation its input (fp32: autocast runs norms in fp32), each GELU its input, each max pooling
  its input and int64 indices, each ReLU its output unless a convolution follows it directly (which
  saves the same tensor); dropout keeps only a channel mask;
- multiply-adds: convolutions and linears (what moevit.models.flops counts for the backbone);
  interpolation, pooling, norms and the losses are elementwise and not counted.

Per head:

- detection (RetinaNet on ViTDet's simple feature pyramid): the pyramid's stacks on the last ViT map,
  the classification and box subnets on every level, then torchvision's ``sigmoid_focal_loss`` on the
  ``A K`` class logits per location, which saves eight fp32 tensors of that size (the logits it
  reads, the targets, p, 1 - targets, 1 - p_t, the BCE, the focal power, alpha_t: checked with
  saved-tensor hooks). The concatenated head outputs and their fp32 copy are only read by the loss
  and freed before the backward; the GIoU box loss covers the few positive anchors;
- segmentation (UperNet on BEiT's multi-level neck): the neck's stacks, the laterals, pyramid pooling,
  the FPN convolutions, the bottleneck on the concatenated levels and the classifier, then the
  cross-entropy's fp32 log-softmax at image size (``4 K H W``; the upsampled logits it reads are freed);
- classification: the pooled token through the norm and the linear, and the logits' log-softmax.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from moevit.heads.classification import ClassificationHead
from moevit.heads.detection import DetectionHead
from moevit.heads.segmentation import UperNetHead
from moevit.models.moe_vit import MoEViT

FP32_BYTES = 4
INDEX_BYTES = 8  # max pooling's int64 indices
FOCAL_LOSS_SAVED = 8  # fp32 tensors of the class-logit size that sigmoid_focal_loss saves (module doc)

Shape = tuple[int, int, int]  # (channels, height, width) of one image's map


@dataclass
class HeadCost:
    bytes: int = 0  # activations kept for the backward
    macs: int = 0  # forward multiply-adds


def walk(chain: nn.Module | Sequence[nn.Module], shape: Shape, c: int, cost: HeadCost) -> Shape:
    """Adds what a chain of 2-d layers (nested Sequentials flattened) costs on one (channels, h, w)
    input to `cost`; returns the output shape."""
    layers = [
        leaf for module in ([chain] if isinstance(chain, nn.Module) else chain) for leaf in _leaves(module)
    ]
    for i, layer in enumerate(layers):
        # A ReLU saves its output, which a convolution right after it saves as its input anyway.
        feeds_conv = i + 1 < len(layers) and isinstance(layers[i + 1], (nn.Conv2d, nn.ConvTranspose2d))
        shape = _layer(layer, shape, c, cost, feeds_conv)
    return shape


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _layer(module: nn.Module, shape: Shape, c: int, cost: HeadCost, feeds_conv: bool) -> Shape:
    channels, h, w = shape
    elements = channels * h * w
    if isinstance(module, nn.Conv2d):
        out_h = (h + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
        out_w = (w + 2 * module.padding[1] - module.kernel_size[1]) // module.stride[1] + 1
        cost.bytes += c * elements
        cost.macs += out_h * out_w * module.weight.numel()  # every output pixel meets the whole kernel
        return module.out_channels, out_h, out_w
    if isinstance(module, nn.ConvTranspose2d):
        out_h = (h - 1) * module.stride[0] - 2 * module.padding[0] + module.kernel_size[0]
        out_w = (w - 1) * module.stride[1] - 2 * module.padding[1] + module.kernel_size[1]
        cost.bytes += c * elements
        cost.macs += h * w * module.weight.numel()  # every input pixel spreads over the whole kernel
        return module.out_channels, out_h, out_w
    if isinstance(module, nn.MaxPool2d):
        out = (channels, h // module.stride, w // module.stride)
        cost.bytes += c * elements + INDEX_BYTES * math.prod(out)
        return out
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)) or "Norm" in type(module).__name__:
        cost.bytes += FP32_BYTES * elements
        return shape
    if isinstance(module, nn.GELU):
        cost.bytes += c * elements
        return shape
    if isinstance(module, nn.ReLU):
        cost.bytes += 0 if feeds_conv else c * elements
        return shape
    if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)):  # dropout2d keeps a (C,) mask
        return shape
    raise TypeError(f"no cost rule for head layer {type(module).__name__}")


def head_cost(head: nn.Module, model: MoEViT, image_hw: tuple[int, int], c: int) -> HeadCost:
    """What one image costs in `head` at `c` compute bytes per element; a head of another kind raises."""
    grid = (model.embed_dim, image_hw[0] // model.patch_size, image_hw[1] // model.patch_size)
    cost = HeadCost()
    if isinstance(head, ClassificationHead):
        # fc_norm's input and the linear's input (fp32 after autocast's LayerNorm), the fp32 log-softmax
        cost.bytes += FP32_BYTES * (2 * model.embed_dim + head.num_classes)
        cost.macs += head.fc.weight.numel()
    elif isinstance(head, DetectionHead):
        _detection(head, grid, c, cost)
    elif isinstance(head, UperNetHead):
        _upernet(head, grid, image_hw, c, cost)
    else:
        raise TypeError(f"no cost formula for head {type(head).__name__}")
    return cost


def _detection(head: DetectionHead, grid: Shape, c: int, cost: HeadCost) -> None:
    pyramid = head.detector.backbone
    levels = [walk(level, grid, c, cost) for level in pyramid.levels]
    for _ in range(pyramid.extra_levels):  # functional max_pool2d(kernel 1, stride 2): indices only
        channels, h, w = levels[-1]
        levels.append((channels, (h - 1) // 2 + 1, (w - 1) // 2 + 1))
        cost.bytes += INDEX_BYTES * math.prod(levels[-1])
    subnets = head.detector.head
    locations = 0
    for shape in levels:
        for subnet, predictor in (
            (subnets.classification_head.conv, subnets.classification_head.cls_logits),
            (subnets.regression_head.conv, subnets.regression_head.bbox_reg),
        ):
            walk([subnet, predictor], shape, c, cost)
        locations += shape[1] * shape[2]
    anchors = head.detector.anchor_generator.num_anchors_per_location()[0]
    cost.bytes += FOCAL_LOSS_SAVED * FP32_BYTES * locations * anchors * head.num_classes


def _upernet(head: UperNetHead, grid: Shape, image_hw: tuple[int, int], c: int, cost: HeadCost) -> None:
    levels = [walk(level, grid, c, cost) for level in head.neck.levels]
    channels = head.classifier.in_channels
    for conv, shape in zip(head.lateral_convs, levels):
        walk(conv, shape, c, cost)
    top = levels[-1]
    cost.bytes += c * math.prod(top)  # adaptive pooling saves its input, the top level
    for branch in head.ppm:
        pooled = branch[0].output_size
        size = (pooled, pooled) if isinstance(pooled, int) else tuple(pooled)
        walk(branch[1], (top[0], *size), c, cost)
    walk(head.ppm_bottleneck, (top[0] + len(head.ppm) * channels, top[1], top[2]), c, cost)
    for conv, shape in zip(head.fpn_convs, levels):
        walk(conv, (channels, shape[1], shape[2]), c, cost)
    finest = levels[0]
    fused = (len(levels) * channels, finest[1], finest[2])
    walk([head.fpn_bottleneck, head.dropout, head.classifier], fused, c, cost)
    # The logits upsampled to the image are read by the loss only; its fp32 log-softmax is kept.
    cost.bytes += FP32_BYTES * head.num_classes * image_hw[0] * image_hw[1]
