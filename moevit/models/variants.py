"""Registered MoE ViT variants.

Sizes follow timm's ViT family (Ti/S/B); MoE blocks are every other block (V-MoE's choice),
experts keep the dense MLP width so a dense checkpoint can upcycle into them, and every variant routes
top-2 (MoEViT's default, stated once there). `moevit_debug` is a few-second model for tests
(torchtitan's "debug flavor" habit).
"""

from __future__ import annotations

from collections.abc import Sequence

from moevit.models.moe_vit import MoEViT
from moevit.models.registry import register_model


def _build(tasks: Sequence[str], defaults: dict, overrides: dict) -> MoEViT:
    return MoEViT(tasks=tasks, **{**defaults, **overrides})


@register_model
def moevit_debug(tasks: Sequence[str], **overrides) -> MoEViT:
    """4 blocks of width 64 on 32 px images: the unit-test model."""
    defaults = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_experts=4)
    return _build(tasks, defaults, overrides)


@register_model
def moevit_tiny(tasks: Sequence[str], **overrides) -> MoEViT:
    """ViT-Ti/16 shape (D=192, 12 blocks, 3 heads) with 8 experts, top-2, on every other block."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_experts=8)
    return _build(tasks, defaults, overrides)


@register_model
def moevit_small(tasks: Sequence[str], **overrides) -> MoEViT:
    """ViT-S/16 shape (D=384, 12 blocks, 6 heads) with 16 experts, top-2, on every other block."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_experts=16)
    return _build(tasks, defaults, overrides)


@register_model
def moevit_base(tasks: Sequence[str], **overrides) -> MoEViT:
    """ViT-B/16 shape (D=768, 12 blocks, 12 heads) with 16 experts, top-2, on every other block."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_experts=16)
    return _build(tasks, defaults, overrides)
