"""One backbone, one head per task: the module a training loop drives.

`forward(task, batch)` runs the backbone with the task's routers, asks the task's head for the
feature maps it needs, and returns the head's named losses next to the routing records, so the
loop adds auxiliary losses explicitly (nothing is hidden in module state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moevit.layers.router import Routing
from moevit.models.moe_vit import MoEViT


@dataclass
class TaskOutput:
    losses: dict[str, torch.Tensor]  # the head's named losses; "loss" is their total
    routing: dict[str, Routing]  # per task-routed layer


class MultiTaskModel(nn.Module):
    """Args:
    backbone: the shared MoE ViT.
    heads: task name -> head with `feature_indices`, `forward_loss(backbone_out, batch)` and
        `predict(backbone_out, batch)` (see moevit.heads).
    """

    def __init__(self, backbone: MoEViT, heads: Mapping[str, nn.Module]):
        super().__init__()
        missing = set(backbone.tasks) ^ set(heads)
        if missing:
            raise ValueError(
                f"backbone tasks {backbone.tasks} and heads {sorted(heads)} differ in {sorted(missing)}"
            )
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return self.backbone.tasks

    def _backbone(self, task: str, images: torch.Tensor):
        indices = self.heads[task].feature_indices
        return self.backbone.forward_backbone(images, task, indices if indices is not None else ())

    def forward(self, task: str, batch: dict) -> TaskOutput:
        out = self._backbone(task, batch["images"])
        return TaskOutput(losses=self.heads[task].forward_loss(out, batch), routing=out.routing)

    @torch.no_grad()
    def predict(self, task: str, batch: dict):
        return self.heads[task].predict(self._backbone(task, batch["images"]), batch)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
