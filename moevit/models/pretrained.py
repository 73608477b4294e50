"""Dense ViT weights from a local file, in MoEViT's names: the file half of `model.init` (issue 16).

Reading goes through timm's own loaders, so a file loads here as it loads into timm:

- `.pth` / `.pt` / `.bin` / `.safetensors`: `timm.models.load_state_dict` (tensors only, `weights_only`;
  it unwraps `{"model": ...}` / `{"state_dict": ...}` checkpoints, which is how MAE's `.pth` holds its
  encoder, and strips DDP's `module.` prefix);
- `.npz` (the original Google/JAX ViT layout): a dense timm `VisionTransformer` of the file's own
  shape (read off its arrays; the backbone's for layouts that hide it) takes it through timm's npz
  loader (`load_checkpoint` -> `_load_weights`); its state_dict is then the dense state, checked and
  resampled like any other.

`upcycled_state` maps the dense names onto a backbone (MoEViT keeps timm's names; in MoE blocks the
dense MLP becomes every expert, see upcycle.py), and `add_expert_noise` breaks the experts' symmetry.
Where the state goes, and the report of what loaded, is moevit.artifacts.init.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from timm.models import load_checkpoint, load_state_dict
from timm.models.vision_transformer import VisionTransformer

from moevit.models.moe_vit import MoEViT
from moevit.models.param_names import expert_key, expert_part_of_dense, mlp_layer_index, parse_key

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
NPZ_SUFFIX = ".npz"
DENSE_SUFFIXES = (*TORCH_SUFFIXES, NPZ_SUFFIX)


def read_dense_state(path: Path, backbone: MoEViT) -> dict[str, torch.Tensor]:
    """The dense ViT's state_dict in timm's names, read from `path` (local, tensors only).

    `backbone` shapes the dense ViT an `.npz` is read into (its width, depth, heads, MLP width, patch
    and grid); a torch file is read as it is. Raises OSError/ValueError/RuntimeError/KeyError from
    the readers, which the caller turns into one line.
    """
    if path.suffix == NPZ_SUFFIX:
        vit = npz_shaped_vit(path) or dense_twin(backbone)
        load_checkpoint(vit, str(path))  # timm: npz -> model.load_pretrained -> _load_weights
        return {key: value for key, value in vit.state_dict().items() if not key.startswith("head.")}
    state = load_state_dict(str(path), weights_only=True)  # timm's choice: EMA weights when present
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("holds no state_dict of tensors")
    return state


def npz_shaped_vit(path: Path) -> VisionTransformer | None:
    """A dense timm ViT with the shape the classic Google `.npz` layout itself has (width, depth, heads,
    MLP width, patch, grid), so that a file of another shape reads whole and the mismatch is then
    named tensor by tensor; None for layouts this does not read (big_vision's), which are read into
    the backbone's shape instead."""
    with np.load(path, allow_pickle=False) as weights:
        files = set(weights.files)
        prefix = next((p for p in ("", "opt/target/") if f"{p}embedding/kernel" in files), None)
        block = f"{prefix}Transformer/encoderblock_0/"
        attention, mlp = f"{block}MultiHeadDotProductAttention_1/", f"{block}MlpBlock_3/Dense_0/kernel"
        pos_key = f"{prefix}Transformer/posembed_input/pos_embedding"
        if prefix is None or mlp not in files or pos_key not in files:
            return None
        patch_h, patch_w, in_chans, width = weights[f"{prefix}embedding/kernel"].shape
        heads = weights[f"{attention}query/kernel"].shape[1]
        hidden = weights[mlp].shape[1]
        positions = weights[pos_key].shape[1]
    depth = sum(
        1 for i in range(len(files)) if f"{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale" in files
    )
    class_token = f"{prefix}cls" in files
    grid = math.isqrt(positions - class_token)
    if grid * grid != positions - class_token or patch_h != patch_w:
        return None
    return VisionTransformer(
        img_size=grid * patch_h,
        patch_size=patch_h,
        in_chans=in_chans,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / width,
        qkv_bias=f"{attention}query/bias" in files,
        class_token=class_token,
        num_classes=0,
    )


def dense_twin(backbone: MoEViT) -> VisionTransformer:
    """A dense timm ViT with `backbone`'s shape (classifier-free): what an `.npz` is read into."""
    hidden = next(
        value.shape[-2]
        for key, value in backbone.state_dict().items()
        if key.endswith(("mlp.fc1.weight", "mlp.experts.fc1_weight"))
    )
    first = backbone.blocks[0]
    return VisionTransformer(
        img_size=backbone.patch_embed.img_size,
        patch_size=backbone.patch_embed.patch_size,
        in_chans=backbone.patch_embed.proj.in_channels,
        embed_dim=backbone.embed_dim,
        depth=len(backbone.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=hidden / backbone.embed_dim,
        qkv_bias=first.attn.qkv.bias is not None,
        class_token=backbone.cls_token is not None,
        num_classes=0,
    )


def upcycled_key(key: str, moe_layers: set[int] | list[int]) -> tuple[str, bool]:
    """(MoEViT name, whether it is a stacked expert tensor) of a dense timm ViT's `key` (unprefixed).

    A dense MLP linear of a block that is MoE in the backbone becomes that block's stacked expert
    tensor (`blocks.3.mlp.fc1.weight` -> `blocks.3.mlp.experts.fc1_weight`); every other name is kept.
    """
    name = parse_key(key, prefix="")
    if name.kind == "dense_mlp" and mlp_layer_index(name.layer) in moe_layers:
        return expert_key(name.layer, expert_part_of_dense(name.part), prefix=""), True
    return key, False


def upcycled_state(
    dense: dict[str, torch.Tensor], backbone: MoEViT
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the backbone's state built from `dense`, the dense keys that became expert tensors).

    Each expert of a MoE layer starts as that block's dense MLP (one copy per expert, the layer's
    expert count read off the backbone). Keys the backbone lacks are passed on unchanged: the caller
    reports them as unexpected.
    """
    moe_layers = set(backbone.moe_layer_indices)
    counts = {
        key: value.shape[0]
        for key, value in backbone.state_dict().items()
        if parse_key(key, prefix="").kind == "expert"
    }
    state, upcycled = {}, []
    for key, value in dense.items():
        new_key, is_expert = upcycled_key(key, moe_layers)
        if is_expert and new_key in counts:
            state[new_key] = value.unsqueeze(0).repeat_interleave(counts[new_key], 0)
            upcycled.append(new_key)
        else:
            state[key] = value
    return state, upcycled


def add_expert_noise(
    state: dict[str, torch.Tensor], keys: list[str], relative_std: float, generator: torch.Generator
) -> None:
    """Adds N(0, (relative_std * std of the dense weight)^2) to every expert's copy of each weight
    matrix in `keys`, in place. Biases stay copies: the weights alone already make the experts differ.

    Why relative: one number fits every layer and model width. The noise comes from `generator` only,
    so every rank draws the same experts."""
    for key in keys:
        if not key.endswith("_weight"):
            continue
        value = state[key]
        scale = relative_std * value[0].float().std()
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * scale
        state[key] = (value.float() + noise).to(value.dtype)
