"""Sparse upcycling (Komatsuzaki et al. 2023): start an MoE ViT from a dense timm ViT.

Every dense weight is copied by name (MoEViT keeps timm's parameter names); in MoE blocks each
expert starts as a copy of that block's dense MLP. Every expert gets the same input and, the gate
weights summing to one, the upcycled model computes what the dense one did (up to rounding) whatever
the gates: for every task, `forward_features(x, task) == vit.forward_features(x)`. The gates start
random (`gate_init_std`, moevit.layers.router): with identical experts nothing else breaks the tie
that zero gates would make (every token to the same k experts), and no gradient would.
The dense classifier head is not part of the backbone and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moevit.layers.router import DEFAULT_GATE_INIT_STD
from moevit.models.moe_vit import MoEViT
from moevit.models.param_names import parse_key
from moevit.models.pretrained import upcycled_key

_NOT_BACKBONE = ("head.", "fc_norm.", "head_drop.", "attn_pool.")


def load_timm_vit(model_name: str, checkpoint_path: str | Path) -> VisionTransformer:
    """Build a timm ViT and load its weights from a local file (no hub access)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"timm checkpoint not found: {path}")
    return timm.create_model(model_name, pretrained=False, checkpoint_path=str(path))


def upcycle_timm_vit(
    vit: VisionTransformer,
    num_experts: int,
    top_k: int,
    tasks: Sequence[str],
    moe_layers: str | Sequence[int] = "every:2",
    task_embedding: bool = False,
    gate_init_std: float = DEFAULT_GATE_INIT_STD,
    router_jitter: float = 0.0,
) -> MoEViT:
    """Build an MoEViT with the same shape as `vit` and copy its weights into it.

    Args:
        vit: a timm `VisionTransformer` (class token, learned absolute position embedding).
            To start from a file, pass `load_timm_vit(name, path)`.
        num_experts: experts per MoE layer; each starts as a copy of the dense MLP.
        top_k: experts per token.
        tasks: task names (one router each).
        moe_layers: which blocks become MoE (see `placement.resolve_moe_layers`).
        task_embedding: add zero-initialised per-task embeddings (keeps the equivalence).
        gate_init_std: std of the gates' random initial weights (0: zero gates, every expert tied).
        router_jitter: training-only jitter of the router inputs (MoEViT's argument).
    """
    _check_supported(vit)
    first_block = vit.blocks[0]
    model = MoEViT(
        tasks=tasks,
        img_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        in_chans=vit.patch_embed.proj.in_channels,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=first_block.attn.num_heads,
        mlp_ratio=first_block.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=first_block.attn.qkv.bias is not None,
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        task_embedding=task_embedding,
        class_token=vit.cls_token is not None,
        gate_init_std=gate_init_std,
        router_jitter=router_jitter,
    )
    state = {}
    for key, value in vit.state_dict().items():
        if key.startswith(_NOT_BACKBONE):
            continue
        moe_key, is_expert = upcycled_key(key, model.moe_layer_indices)
        state[moe_key] = value.unsqueeze(0).repeat_interleave(num_experts, 0) if is_expert else value
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_in_moe = ("gate", "task_embedding")  # the routers' weights: nothing dense to copy
    missing = [key for key in missing if parse_key(key, prefix="").kind not in new_in_moe]
    if missing or unexpected:
        raise ValueError(f"dense ViT does not map onto MoEViT: missing {missing}, unexpected {unexpected}")
    return model


def _check_supported(vit: nn.Module) -> None:
    """Refuse ViT features MoEViT does not reproduce, rather than silently differ."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    unsupported = {
        "register tokens": vit.reg_token is not None,
        "position embedding without class slot (no_embed_class)": vit.no_embed_class,
        "pre-norm before blocks (norm_pre)": not isinstance(vit.norm_pre, nn.Identity),
        "LayerScale": not isinstance(vit.blocks[0].ls1, nn.Identity),
        "qk-norm": not isinstance(getattr(vit.blocks[0].attn, "q_norm", nn.Identity()), nn.Identity),
        "missing position embedding": vit.pos_embed is None,
        "dynamic image size": vit.dynamic_img_size,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"cannot upcycle this ViT: unsupported {', '.join(found)}")


@torch.no_grad()
def max_upcycling_error(vit: VisionTransformer, model: MoEViT, images: torch.Tensor) -> float:
    """Largest |difference| between dense and upcycled features over all tasks (a sanity check)."""
    reference = vit.forward_features(images)
    return max((model.forward_features(images, task) - reference).abs().max().item() for task in model.tasks)
