"""Analytic estimate of the activation memory one training forward keeps for its backward.

The per-layer count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1), adapted to what this model's layers save. Per image, with T tokens,
width D, MLP width H, h heads, and for MoE layers E experts, top-K, expert width H_e and S = K T
routed rows; ``c`` bytes per element at the compute precision (2 in bf16 autocast, 4 in fp32) and
``f`` = 4 for what stays fp32 under autocast (the residual stream, norm inputs, the routers):

    global attention      f T D  +  c T D (qkv input) + 3 c T D (q, k, v) + c T D (SDPA output)
                          + c T D (projection input)  +  4 h T (SDPA log-sum-exp)
    windowed attention    the same with T -> T_w for everything after norm1: the patch grid
                          zero-padded to whole w x w windows plus the prefix tokens (ViTDet)
    dense MLP             f T D  +  c T D (fc1 input) + 2 c T H (fc1 output, GELU output)
    MoE MLP               f T D  +  f T D (router input) + 2 f T E (gate logits, probabilities)
                          + c S (2 D + H_e) (dispatched rows, pre-activation, expert outputs)
    mixture of attention  f T D  +  f T D + 2 f T E + c (S (2 D + 3 d_h) + T (D + 2 d_h))
    heads                 see below
    backbone ends         c 3 H W (patch-embedding input) + f T D (final norm input)

Differences from Korthikanti et al.: fused attention (flash / memory-efficient SDPA, what
PyTorch picks on GPU, and its CPU flash kernel for fp32) keeps no T x T score matrix, only its
output and log-sum-exp, so there is no ``5 h T^2`` term; ViTs train without attention or hidden
dropout, so there are no dropout masks; the MoE experts save only the pre-activation
(moevit.layers.experts recomputes the GELU in the backward).

Heads: from their main feature maps, walking the head's own layer stacks (moevit.train.head_cost:
each convolution, norm and GELU saves its input; RetinaNet's focal loss and the segmentation logits at
image size add their fp32 tensors).

Not counted: parameters, gradients and optimizer state (plan reports parameters apart), the input
batch, allocator fragmentation, and workspace of kernels that is freed before the backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.layers import Attention, Mlp
from torch import nn

from moevit.layers.moe_attention import MoEAttention
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.moe_vit import MoEViT
from moevit.train.head_cost import FP32_BYTES, head_cost

COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Windows:
    """Which blocks attend within windows (ModelConfig.window_size / global_blocks)."""

    size: int = 0  # 0: every block attends globally
    global_blocks: tuple[int, ...] = ()

    def windowed(self, block: int) -> bool:
        return self.size > 0 and block not in self.global_blocks


def backbone_bytes(
    model: MoEViT,
    image_hw: tuple[int, int],
    precision: str,
    windows: Windows = Windows(),
    checkpointing: bool = False,
) -> dict[str, int]:
    """Bytes one image keeps in the backbone, by part ("attention", "mlp", "ends"); with per-block
    activation checkpointing (train.activation_checkpointing) by "block inputs", "block rerun", "ends"."""
    c = COMPUTE_BYTES[precision]
    height, width = image_hw
    grid_h, grid_w = height // model.patch_size, width // model.patch_size
    prefix = model.num_prefix_tokens
    tokens = prefix + grid_h * grid_w
    dim = model.embed_dim
    parts = {"attention": 0, "mlp": 0, "ends": c * 3 * height * width + FP32_BYTES * tokens * dim}
    block_totals = []
    for i, block in enumerate(model.blocks):
        attention_tokens = tokens
        if windows.windowed(i):
            w = windows.size
            attention_tokens = prefix + math.ceil(grid_h / w) * w * math.ceil(grid_w / w) * w
        attention = _attention_bytes(block.attn, tokens, attention_tokens, dim, c)
        mlp = _mlp_bytes(block.mlp, tokens, dim, c)
        parts["attention"] += attention
        parts["mlp"] += mlp
        block_totals.append(attention + mlp)
    if not checkpointing:
        return parts
    # Checkpointed: each block keeps only its fp32 input until the backward, which then reruns one block
    # at a time and holds that block's activations (the largest block bounds the peak). The routing
    # records leaving a block are a few values per token, left out like the other small terms.
    return {
        "block inputs": FP32_BYTES * tokens * dim * len(model.blocks),
        "block rerun": max(block_totals, default=0),
        "ends": parts["ends"],
    }


def _attention_bytes(attn: nn.Module, tokens: int, attention_tokens: int, dim: int, c: int) -> int:
    stream = FP32_BYTES * tokens * dim  # norm1's input
    if isinstance(attn, MoEAttention):
        rows = tokens * attn.top_k
        router = FP32_BYTES * (tokens * dim + 2 * tokens * attn.num_experts)
        d_h = attn.head_dim
        return stream + router + c * (rows * (2 * dim + 3 * d_h) + tokens * (dim + 2 * d_h))
    if isinstance(attn, Attention):
        t = attention_tokens
        return stream + c * 6 * t * dim + FP32_BYTES * attn.num_heads * t
    raise TypeError(f"no activation-memory formula for attention layer {type(attn).__name__}")


def _mlp_bytes(mlp: nn.Module, tokens: int, dim: int, c: int) -> int:
    stream = FP32_BYTES * tokens * dim  # norm2's input
    if isinstance(mlp, MoEMlp):
        rows = tokens * mlp.top_k
        router = FP32_BYTES * (tokens * dim + 2 * tokens * mlp.num_experts)
        return stream + router + c * rows * (2 * dim + mlp.experts.fc1_weight.shape[1])
    if isinstance(mlp, Mlp):
        return stream + c * tokens * (dim + 2 * mlp.fc1.out_features)
    raise TypeError(f"no activation-memory formula for MLP layer {type(mlp).__name__}")


def task_activation_bytes(
    model: MoEViT,
    head: nn.Module,
    image_hw: tuple[int, int],
    batch_size: int,
    precision: str,
    windows: Windows = Windows(),
    checkpointing: bool = False,
) -> dict[str, int]:
    """{"backbone", "head", "total"}: bytes a training forward of `batch_size` images keeps;
    `checkpointing`: with per-block activation checkpointing (see `backbone_bytes`)."""
    backbone = sum(backbone_bytes(model, image_hw, precision, windows, checkpointing).values())
    task_head = head_cost(head, model, image_hw, COMPUTE_BYTES[precision]).bytes
    return {
        "backbone": batch_size * backbone,
        "head": batch_size * task_head,
        "total": batch_size * (backbone + task_head),
    }


def windows_of(window_size: int | None, global_blocks: Sequence[int] | None) -> Windows:
    """The Windows of a ModelConfig's fields (None: the variant's default, global attention)."""
    return Windows(window_size or 0, tuple(global_blocks or ()))


@contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[dict[int, int]]:
    """What this module estimates, measured: inside the block, the bytes of every tensor autograd saves for
    the backward, each storage once, the model's parameters left out (a linear saves its weight, which is
    not an activation). Yields {storage address: bytes}, filled as the forward runs; sum its values."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
