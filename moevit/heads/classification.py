"""Image classification head: pooled ViT tokens -> linear classifier (Dosovitskiy et al. 2021).

Two poolings, as timm's `VisionTransformer(global_pool=...)`: the class token ("token"), or the mean
of the patch tokens ("avg") followed by a LayerNorm (timm's `fc_norm`, from MAE's fine-tuning
recipe). The backbone has already normalised every token; averaging shrinks their spread, and the
second LayerNorm restores the scale the classifier was initialised for.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from moevit.heads.checks import batch_entry, check_class_labels
from moevit.models.moe_vit import BackboneOutput


class ClassificationHead(nn.Module):
    """Pooled token(s) -> (LayerNorm) -> dropout -> Linear.

    Args:
        embed_dim: token width D.
        num_classes: output logits.
        pool: "token" reads the first prefix token (the class token); "avg" averages the patch tokens.
        num_prefix_tokens: class/register tokens in front of the patch tokens (backbone's attribute).
        drop_rate: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing (0 = plain cross-entropy).
    """

    feature_indices = None  # final tokens only

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        pool: Literal["token", "avg"] = "token",
        num_prefix_tokens: int = 1,
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
        if pool == "token" and num_prefix_tokens < 1:
            raise ValueError(
                "pool='token' needs a class token, but the backbone has no prefix tokens; use pool='avg'"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.label_smoothing = label_smoothing
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)  # timm's ViT init
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from tokens (B, prefix + N, D)."""
        if tokens.ndim != 3:
            raise ValueError(
                f"ClassificationHead expects tokens (B, prefix + N, D), got {tuple(tokens.shape)}"
            )
        if self.pool == "token":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return self.fc(self.head_drop(self.fc_norm(pooled)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_class_labels(labels, self.num_classes, "ClassificationHead.loss")
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def forward_loss(self, backbone_out: BackboneOutput, batch: dict) -> dict[str, torch.Tensor]:
        return {
            "loss": self.loss(self(backbone_out.tokens), batch_entry(batch, "labels", "ClassificationHead"))
        }

    def predict(self, backbone_out: BackboneOutput, batch: dict) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self(backbone_out.tokens)
