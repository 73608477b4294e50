"""The configuration schema: the only place defaults live.

A run's YAML file maps onto `Config`; unknown keys and wrong types are errors (see loader.py).
Model sizes are the registered variant's (moevit.models.variants); a `None` here means "keep
the variant's value", so a config only names what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

TaskType = Literal["classification", "detection", "segmentation"]
DatasetFormat = Literal["imagenet", "coco", "ade20k"]

# Which dataset format serves which task type.
FORMAT_TASK_TYPE: dict[str, str] = {
    "imagenet": "classification",
    "coco": "detection",
    "ade20k": "segmentation",
}


@dataclass
class MoEConfig:
    num_experts: int | None = None
    top_k: int | None = None
    expert_hidden: int | None = None  # None: the dense MLP width (lets dense weights upcycle)
    layers: str | list[int] | None = None  # "every:2", "last:4", "all", "none" or block indices
    task_embedding: bool | None = None
    attention_experts: int | None = None  # mixture of attention heads on MoE blocks; 0 = off
    attention_top_k: int | None = None
    attention_head_dim: int | None = None

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "expert_hidden", "attention_top_k", "attention_head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.attention_experts is not None and self.attention_experts < 0:
            raise ValueError(f"attention_experts must be >= 0, got {self.attention_experts}")


@dataclass
class ModelConfig:
    name: str = "moevit_tiny"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)

    def variant_overrides(self) -> dict:
        """Constructor arguments for `create_model`, only those this config sets."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "moe")}
        moe = {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        moe["moe_layers"] = moe.pop("layers")
        return {key: value for key, value in {**overrides, **moe}.items() if value is not None}

    def validate(self) -> None:
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class DatasetConfig:
    format: DatasetFormat
    root: str
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 32

    def validate(self) -> None:
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError("image_size and batch_size must be >= 1")


@dataclass
class TaskConfig:
    type: TaskType
    num_classes: int
    data: DatasetConfig | None = None
    loss_weight: float = 1.0  # static weight; the loss balancer may change it during training

    def validate(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if self.data is not None and FORMAT_TASK_TYPE[self.data.format] != self.type:
            raise ValueError(
                f"dataset format {self.data.format!r} serves {FORMAT_TASK_TYPE[self.data.format]}, not {self.type}"
            )


@dataclass
class AuxLossConfig:
    """Coefficients of the auxiliary MoE losses (moevit.layers.aux_losses)."""

    load_balance: float = 0.01  # Switch Transformer's alpha
    z_loss: float = 0.001  # ST-MoE's router z-loss coefficient
    mutual_information: float = 0.01  # Mod-Squad's MI loss; 0 turns task specialisation pressure off

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclass
class Config:
    tasks: dict[str, TaskConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    seed: int = 0
    output_dir: str = "runs/default"

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
