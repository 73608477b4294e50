"""Image classification head: pooled ViT tokens -> linear classifier (Dosovitskiy et al. 2021).

Two poolings, as timm's `VisionTransformer(global_pool=...)`: the class token ("token"), or the mean
of the patch tokens ("avg") followed by a LayerNorm (timm's `fc_norm`, from MAE's fine-tuning
recipe). The backbone has already normalised every token; averaging shrinks their spread, and the
second LayerNorm restores the scale the classifier was initialised for.

The loss takes hard labels (B,) int64 (cross-entropy) or soft targets (B, C) float, as Mixup/CutMix and
label smoothing make them (moevit.data.mixup): the soft-target cross-entropy, mean over the batch of
-sum_c target_c log softmax(logits)_c (timm's SoftTargetCrossEntropy). Label smoothing is not a head
option: it lives in the data settings, which build the targets, so it is never applied twice.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from moevit.heads.checks import batch_entry, check_class_labels, check_soft_targets
from moevit.models.moe_vit import BackboneOutput


class ClassificationHead(nn.Module):
    """Pooled token(s) -> (LayerNorm) -> dropout -> Linear.

    Args:
        embed_dim: token width D.
        num_classes: output logits.
        pool: "token" reads the first prefix token (the class token); "avg" averages the patch tokens.
        num_prefix_tokens: class/register tokens in front of the patch tokens (backbone's attribute).
        drop_rate: dropout before the classifier.
    """

    feature_indices = None  # final tokens only

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        pool: Literal["token", "avg"] = "token",
        num_prefix_tokens: int = 1,
        drop_rate: float = 0.0,
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
        """Cross-entropy against hard labels (B,) int64 or soft targets (B, num_classes) float."""
        if isinstance(labels, torch.Tensor) and labels.is_floating_point():
            check_soft_targets(labels, logits.shape[0], self.num_classes, "ClassificationHead.loss")
            # torch's cross-entropy with class probabilities; in float32, as autocast would run it.
            return nn.functional.cross_entropy(logits.float(), labels.float())
        check_class_labels(labels, self.num_classes, "ClassificationHead.loss")
        return nn.functional.cross_entropy(logits, labels)

    def forward_loss(self, backbone_out: BackboneOutput, batch: dict) -> dict[str, torch.Tensor]:
        return {
            "loss": self.loss(self(backbone_out.tokens), batch_entry(batch, "labels", "ClassificationHead"))
        }

    def predict(self, backbone_out: BackboneOutput, batch: dict) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self(backbone_out.tokens)
