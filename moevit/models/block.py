"""A timm ViT block whose forward also takes the task name (and the patch grid, for windowed attention).

The block is timm's `Block` (attention, norms, LayerScale, DropPath all built by timm); only
`forward` changes, so that a task-routed MLP (or attention) can receive the task and hand back
its routing record. Dense blocks ignore the task, which keeps every block's signature the same.

Windowed attention (ViTDet, Li et al. ECCV 2022): with `window_size` w > 0 the patch tokens attend
within non-overlapping w x w windows of the patch grid. The grid is zero-padded at the bottom/right to
a multiple of w after `norm1` and cropped after attention, as ViTDet and SAM do (padded positions are
keys like any other, unmasked); timm's own `window_partition` / `window_unpartition` do the reshaping
and timm's `Attention` runs unchanged on the windows. Prefix tokens (the class token) attend among
themselves only in a windowed block, so nothing crosses a window boundary there; they meet the patch
tokens in the global blocks. Norms and the MLP (dense or MoE) see the unpadded sequence as before, so
routing records and pruning do not change with windows.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from timm.models.vision_transformer_sam import window_partition, window_unpartition

from moevit.layers.router import Routing


def routes_tasks(module: torch.nn.Module) -> bool:
    """Task-routed layers take (x, task) and return (y, Routing)."""
    return getattr(module, "routes_tasks", False)


class TaskBlock(Block):
    """timm's pre-norm ViT block with task-aware sub-layers.

    Constructed exactly like `timm.models.vision_transformer.Block`, plus `window_size` (0: global
    attention; w > 0: attention within w x w token windows, see the module doc); swap `attn` or `mlp`
    for a task-routed module after construction (a task-routed `attn` needs `window_size` 0).
    """

    def __init__(self, *args, window_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention), got {window_size}")
        self.window_size = window_size

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, task: str, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict[str, Routing]]:
        """x: (B, prefix + grid_h * grid_w, D); `grid` = (grid_h, grid_w), needed by windowed blocks."""
        routing: dict[str, Routing] = {}
        h = self.norm1(x)
        if routes_tasks(self.attn):
            if self.window_size:
                raise ValueError("a task-routed attention layer cannot run in a windowed block")
            h, routing["attn"] = self.attn(h, task)
        elif self.window_size:
            h = self._windowed_attention(h, grid)
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

    def _windowed_attention(self, h: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        if grid is None:
            raise ValueError("a windowed block needs the patch grid: call it with grid=(grid_h, grid_w)")
        batch, num_tokens, dim = h.shape
        grid_h, grid_w = grid
        prefix = num_tokens - grid_h * grid_w
        if prefix < 0:
            raise ValueError(f"{num_tokens} tokens cannot hold a {grid_h}x{grid_w} patch grid")
        w = self.window_size
        patches = h[:, prefix:].reshape(batch, grid_h, grid_w, dim)
        windows, padded_hw = window_partition(patches, w)  # (B * windows, w, w, D), zero-padded
        attended = self.attn(windows.reshape(-1, w * w, dim)).reshape(windows.shape)
        patches = window_unpartition(attended, w, (grid_h, grid_w), padded_hw)
        patches = patches.reshape(batch, grid_h * grid_w, dim)
        if not prefix:
            return patches
        return torch.cat([self.attn(h[:, :prefix]), patches], dim=1)
