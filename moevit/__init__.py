"""moevit: multi-task sparse Mixture-of-Experts ViTs with task-conditioned routing."""

from moevit.models import create_model, list_models, upcycle_timm_vit

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "upcycle_timm_vit"]
