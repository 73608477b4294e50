"""Build the backbone a config describes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moevit.models.moe_vit import MoEViT
from moevit.models.registry import create_model

if TYPE_CHECKING:
    from moevit.config.schema import Config


def build_backbone(cfg: Config) -> MoEViT:
    """The registered variant `cfg.model.name` with the config's overrides, one router per task."""
    return create_model(cfg.model.name, tasks=list(cfg.tasks), **cfg.model.variant_overrides())
