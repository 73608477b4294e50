"""A timm ViT block whose forward also takes the task name.

The block is timm's `Block` (attention, norms, LayerScale, DropPath all built by timm); only
`forward` changes, so that a task-routed MLP (or attention) can receive the task and hand back
its routing record. Dense blocks ignore the task, which keeps every block's signature the same.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

from moevit.layers.router import Routing


def routes_tasks(module: torch.nn.Module) -> bool:
    """Task-routed layers take (x, task) and return (y, Routing)."""
    return getattr(module, "routes_tasks", False)


class TaskBlock(Block):
    """timm's pre-norm ViT block with task-aware sub-layers.

    Constructed exactly like `timm.models.vision_transformer.Block`; swap `attn` or `mlp` for a
    task-routed module after construction.
    """

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, dict[str, Routing]]:  # type: ignore[override]
        routing: dict[str, Routing] = {}
        h = self.norm1(x)
        if routes_tasks(self.attn):
            h, routing["attn"] = self.attn(h, task)
        else:
            h = self.attn(h)
        x = x + self.drop_path1(self.ls1(h))
        h = self.norm2(x)
        if routes_tasks(self.mlp):
            h, routing["mlp"] = self.mlp(h, task)
        else:
            h = self.mlp(h)
        x = x + self.drop_path2(self.ls2(h))
        return x, routing
