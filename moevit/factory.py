"""The composition root: builds the models a config describes (backbone from moevit.models, one head per
task from moevit.heads). It sits above both, so neither imports the other's builder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moevit.heads import build_head
from moevit.models.moe_vit import MoEViT
from moevit.models.multitask import MultiTaskModel
from moevit.models.registry import create_model

if TYPE_CHECKING:
    from moevit.config.schema import Config


def build_backbone(cfg: Config) -> MoEViT:
    """The registered variant `cfg.model.name` with the config's overrides, one router per task (the
    tasks of `continual.task_experts` restricted to their first experts, see moevit.continual)."""
    task_experts = dict(cfg.continual.task_experts) if cfg.continual is not None else {}
    extra = {"task_experts": task_experts} if task_experts else {}
    return create_model(cfg.model.name, tasks=list(cfg.tasks), **cfg.model.variant_overrides(), **extra)


def build_model(cfg: Config) -> MultiTaskModel:
    """Backbone plus one head per task (`tasks.<name>.head_options` go to the head's constructor)."""
    backbone = build_backbone(cfg)
    heads = {
        name: build_head(
            task.type,
            task.num_classes,
            backbone,
            task.image_size,
            **task.head_options,
        )
        for name, task in cfg.tasks.items()
    }
    return MultiTaskModel(backbone, heads)
