"""Expansion: N new experts in every MoE MLP layer and a router, head and task embedding for a new task.

Starting point: a training checkpoint (its consolidated single-device weights and config, read as the
pruner reads them, moevit.prune.source). The expanded architecture is the source config plus the new
task, with `model.moe.num_experts` = E + N and a `continual:` section (moevit.config.schema):

- old experts keep their indices 0..E-1; the new ones are E..E+N-1, initialised as copies of the most
  used old experts (Mod-Squad's expansion; usage summed over the old tasks as per-task shares) or fresh;
- every old task's gate keeps exactly its old rows (`continual.task_experts`): its logits, top-k and
  weights are computed as before, bit for bit, and it never reaches a new expert;
- the new task's gate covers all E + N experts and starts as the expanded model's fresh gate (random,
  like every fresh gate: moevit.layers.router);
  its head and task embedding are new;
- everything the old tasks use is frozen for training (`continual.frozen_experts` = E,
  `continual.train_tasks` = [new task]; moevit.continual.freeze).

Before writing, the old tasks' backbone outputs (tokens, feature maps, routing) on a random batch are
compared with the source model's: they must be bit-identical, or nothing is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moevit.config.errors import ConfigError
from moevit.config.loader import apply_overrides, build_config, config_to_dict
from moevit.config.schema import (
    FORMAT_TASK_TYPE,
    Config,
    ContinualConfig,
    DatasetConfig,
    TaskConfig,
    TaskSamplingConfig,
)
from moevit.factory import build_model
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import parse_key

EXPERT_INITS = ("copy", "fresh")
_TASK_FORMAT = {task_type: fmt for fmt, task_type in FORMAT_TASK_TYPE.items()}


def experts_per_layer(model: MultiTaskModel) -> int:
    """E, the experts of every MoE MLP layer (one count: a pruned model cannot be expanded)."""
    counts = {layer.num_experts for layer in model.backbone.mlp_layers().values()}
    if len(counts) != 1:
        raise ValueError(
            f"expansion needs MoE MLP layers with one expert count, the source has {sorted(counts) or 'none'}"
        )
    return counts.pop()


def new_task_config(
    task_type: str,
    num_classes: int,
    data_root: str | None,
    image_size: int,
    batch_size: int,
    head_options: Mapping[str, Any] | None = None,
) -> TaskConfig:
    """The new task's config entry; the dataset format follows the head (classification: imagenet, ...)."""
    data = None
    if data_root is not None:
        data = DatasetConfig(
            format=_TASK_FORMAT[task_type], root=str(data_root), image_size=image_size, batch_size=batch_size
        )
    return TaskConfig(
        type=task_type, num_classes=num_classes, data=data, head_options=dict(head_options or {})
    )


def expanded_config(
    cfg: Config,
    old_experts: int,
    task: str,
    task_cfg: TaskConfig,
    new_experts: int,
    init_dir: str | Path,
    overrides: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> Config:
    """The source config plus the new task, E + N experts and the `continual` section; then `settings`
    (sections of a config file merged in, e.g. configs/continual_downstream.yaml) and `overrides`."""
    if task in cfg.tasks:
        raise ValueError(f"--new-task {task!r}: the source already has that task ({list(cfg.tasks)})")
    if new_experts < 1:
        raise ValueError(f"--new-experts must be >= 1, got {new_experts}")
    previous = cfg.continual.task_experts if cfg.continual is not None else {}
    continual = ContinualConfig(
        init=str(init_dir),
        # Tasks already restricted (an earlier expansion) keep their count; the others had all E.
        task_experts={name: previous.get(name, old_experts) for name in cfg.tasks},
        frozen_experts=old_experts,
        train_tasks=[task],
        train_shared=False,
    )
    expanded = dataclasses.replace(
        cfg,
        tasks={**cfg.tasks, task: task_cfg},
        model=dataclasses.replace(
            cfg.model,
            moe=dataclasses.replace(cfg.model.moe, num_experts=old_experts + new_experts),
            # The expanded weights (continual.init) are the start; the source run's own start is spent.
            init=None,
            init_expert_noise=None,
        ),
        # One task trains: the old per-task ratios would not name it.
        train=dataclasses.replace(cfg.train, sampling=TaskSamplingConfig()),
        continual=continual,
    )
    data = apply_overrides(merge_settings(config_to_dict(expanded), settings or {}), list(overrides))
    ep_size = (data.get("parallel") or {}).get("ep_size", 1)
    if isinstance(ep_size, int) and ep_size >= 1 and (old_experts + new_experts) % ep_size:
        raise ConfigError(
            "--new-experts",
            f"{old_experts} + {new_experts} = {old_experts + new_experts} experts per layer is not divisible "
            f"by parallel.ep_size={ep_size}; choose N so that {old_experts} + N is a multiple of {ep_size} "
            "(or override parallel.ep_size)",
        )
    result = build_config(Config, data, source="moevit expand (the expanded config)")
    if result.continual != continual or result.model.moe.num_experts != old_experts + new_experts:
        raise ValueError(
            "overrides must not change 'continual' or 'model.moe.num_experts' (expand decides them)"
        )
    return result


SETTINGS_SECTIONS = ("train", "aux_loss", "parallel", "output_dir", "seed")


def merge_settings(
    data: dict[str, Any], settings: Mapping[str, Any], where: str = "--settings"
) -> dict[str, Any]:
    """`data` with the training sections of `settings` merged in, key by key (the model, the tasks and
    `continual` stay the expansion's)."""
    unknown = sorted(set(settings) - set(SETTINGS_SECTIONS))
    if unknown:
        raise ConfigError(where, f"sections {unknown} cannot be set here; allowed: {list(SETTINGS_SECTIONS)}")

    def merged(base: Any, extra: Any) -> Any:
        if isinstance(base, dict) and isinstance(extra, Mapping):
            return {**base, **{k: merged(base.get(k), v) for k, v in extra.items()}}
        return extra

    return merged(data, settings)


def rank_experts(usage: Mapping[str, Sequence[int]], num_experts: int) -> list[int]:
    """Expert ids, most used first: the mean over tasks of each task's share; ties to the lower id."""
    score = [0.0] * num_experts
    for counts in usage.values():
        total = sum(counts)
        for e, count in enumerate(counts[:num_experts]):
            score[e] += count / total if total else 0.0
    return sorted(range(num_experts), key=lambda e: (-score[e], e))


def expand_state_dict(
    source_state: Mapping[str, torch.Tensor],
    target: MultiTaskModel,
    task: str,
    old_experts: int,
    copied_from: Mapping[str, Sequence[int]] | None,
) -> dict[str, torch.Tensor]:
    """The expanded model's weights: the source's, the new experts (copies or `target`'s fresh init) and
    the new task's parameters (`target`'s init). Every source tensor must be used, key by key."""
    out, used = {}, set()
    for key, like in target.state_dict().items():
        name = parse_key(key)
        if name.kind == "expert" and key in source_state:
            old = source_state[key]
            if old.shape[0] != old_experts or old.shape[1:] != like.shape[1:]:
                raise ValueError(f"{key}: source shape {tuple(old.shape)} does not fit {tuple(like.shape)}")
            value = like.clone()
            value[:old_experts] = old
            if copied_from is not None:
                value[old_experts:] = old[list(copied_from[name.layer])]
        elif key in source_state:
            value = source_state[key]
            if value.shape != like.shape:
                raise ValueError(f"{key}: source shape {tuple(value.shape)}, expanded {tuple(like.shape)}")
            value = value.clone()
        elif name.task == task:  # its gate, usage counter, task embedding or head
            value = like.clone()
        else:
            raise ValueError(
                f"{key}: neither in the source checkpoint nor a parameter of the new task {task!r}"
            )
        used.add(key)
        out[key] = value
    unused = sorted(set(source_state) - used)
    if unused:
        raise ValueError(f"source tensors without a place in the expanded model: {unused[:5]}")
    return out


@torch.no_grad()
def check_old_tasks_unchanged(
    source: MultiTaskModel, expanded: MultiTaskModel, image_sizes: Mapping[str, int], seed: int = 0
) -> None:
    """Old tasks' tokens, feature maps and routing on a random batch: bit-identical, else ValueError."""
    generator = torch.Generator().manual_seed(seed)
    was = source.training, expanded.training
    source.eval()
    expanded.eval()
    try:
        for task in source.tasks:
            size = image_sizes[task]
            images = torch.randn(2, 3, size, size, generator=generator)
            indices = source.heads[task].feature_indices
            before = source.backbone.forward_backbone(images, task, indices if indices is not None else ())
            after = expanded.backbone.forward_backbone(images, task, indices if indices is not None else ())
            pairs = [("tokens", before.tokens, after.tokens)]
            pairs += [
                (f"feature map {i}", b, a)
                for i, (b, a) in enumerate(zip(before.intermediates, after.intermediates))
            ]
            for layer, routing in before.routing.items():
                pairs.append((f"{layer} experts", routing.expert_idx_TK, after.routing[layer].expert_idx_TK))
                pairs.append((f"{layer} weights", routing.weights_TK, after.routing[layer].weights_TK))
            for what, b, a in pairs:
                if not torch.equal(b, a):
                    raise ValueError(f"task {task!r}: {what} differ after the expansion (not bit-identical)")
    finally:
        source.train(was[0])
        expanded.train(was[1])


def build_expanded(
    cfg: Config,
    source_model: MultiTaskModel,
    source_state: Mapping[str, torch.Tensor],
    task: str,
    new_experts: int,
    expert_init: str,
    usage: Mapping[str, Mapping[str, Sequence[int]]] | None,
) -> tuple[MultiTaskModel, dict[str, list[int]] | None]:
    """The expanded model (`cfg` is the expanded config) and which old expert each new one copies."""
    if expert_init not in EXPERT_INITS:
        raise ValueError(f"--expert-init must be one of {EXPERT_INITS}, got {expert_init!r}")
    old_experts = experts_per_layer(source_model)
    copied_from = None
    if expert_init == "copy":
        copied_from = {}
        for layer in source_model.backbone.mlp_layers():
            ranked = rank_experts((usage or {}).get(layer, {}), old_experts)
            copied_from[layer] = [ranked[j % old_experts] for j in range(new_experts)]
    torch.manual_seed(cfg.seed)
    target = build_model(cfg)
    target.load_state_dict(expand_state_dict(source_state, target, task, old_experts, copied_from))
    return target.eval(), copied_from
