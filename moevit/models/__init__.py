"""MoE ViT models: registry, variants, upcycling. Single-device code; never imports deepspeed."""

from moevit.models import variants as _variants  # noqa: F401  (registers the variants)
from moevit.models.moe_vit import BackboneOutput, MoEViT
from moevit.models.registry import create_model, list_models, register_model
from moevit.models.upcycle import upcycle_timm_vit

__all__ = ["BackboneOutput", "MoEViT", "create_model", "list_models", "register_model", "upcycle_timm_vit"]
