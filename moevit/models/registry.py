"""Model registry, timm-style: variants are small registered functions of keyword arguments.

model = moevit.create_model("moevit_tiny", tasks=["imagenet", "coco", "ade20k"], top_k=1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODEL_ENTRYPOINTS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODEL_ENTRYPOINTS)


def create_model(name: str, tasks: Sequence[str], **overrides) -> nn.Module:
    """Build a registered variant; `overrides` replace the variant's constructor arguments."""
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name](tasks=tasks, **overrides)
