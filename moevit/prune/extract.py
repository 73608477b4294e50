"""Extraction: slice a trained multi-task model down to some tasks and a plan of kept experts.

For each MoE MLP layer the kept experts' stacked weights (fc1/fc2 weight and bias, index dim 0) and,
for every kept task, the matching rows of its gate (and of its usage counter) are copied; a layer
keeping a single expert gets that expert's weights as a plain MLP. Everything else shared (patch
embedding, attention, norms, dense MLPs) is copied unchanged, the kept tasks' heads and task
embeddings too; other tasks' gates, embeddings and heads are dropped. The target architecture comes
from the manifest (manifest.py), so the copy is checked key by key and shape by shape.

A task restricted to a layer's first n experts (trained before a continual expansion; its gate has n
rows) keeps the gate rows of the kept experts among those n. Kept ids are sorted and the experts it
reaches are a prefix of the source's, so in the pruned layer it again reaches a prefix: the first
`len(kept ids < n)`, recorded in the manifest's `task_experts`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moevit.artifacts.model_dir import WEIGHTS_FILE, Manifest, build_from_manifest, write_manifest
from moevit.config import save_config
from moevit.config.schema import Config
from moevit.models.moe_vit import MoEViT
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import expert_key, expert_part_of_dense, is_mlp_layer, parse_key


def check_tasks(tasks: Sequence[str], available: Sequence[str], source: str = "--task") -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError(f"{source}: name at least one task")
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(f"{source}: unknown task(s) {unknown}; the checkpoint's tasks are {list(available)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{source}: task names repeat: {tasks}")
    return tasks


def restricted_tasks(backbone: MoEViT) -> dict[str, dict[str, int]]:
    """layer -> task -> n for the tasks that route among a layer's first n experts only."""
    restricted: dict[str, dict[str, int]] = {}
    for name, layer in backbone.mlp_layers().items():
        for task in layer.router.tasks:
            n = layer.router.routable_experts(task)
            if n < layer.num_experts:
                restricted.setdefault(name, {})[task] = n
    return restricted


def pruned_task_experts(
    backbone: MoEViT, tasks: Sequence[str], plan: Mapping[str, Sequence[int]]
) -> dict[str, dict[str, int]]:
    """task -> layer -> n: the restricted tasks' reach in the pruned layers (see the module doc)."""
    out: dict[str, dict[str, int]] = {}
    for layer, by_task in restricted_tasks(backbone).items():
        kept = plan[layer]
        for task, n in by_task.items():
            if task not in tasks:
                continue
            reach = sum(1 for i in kept if i < n)
            if reach == 0:
                raise ValueError(
                    f"the plan leaves task {task!r} no expert it can route to in {layer} (it reaches only "
                    f"the experts it was trained with, 0..{n - 1}); keep at least one of them"
                )
            if 1 < len(kept) and reach < len(kept):  # a one-expert layer is a plain MLP: no routing
                out.setdefault(task, {})[layer] = reach
    return out


def check_plan(plan: Mapping[str, Sequence[int]], backbone: MoEViT) -> None:
    layers = backbone.mlp_layers()
    if sorted(plan) != sorted(layers):
        raise ValueError(
            f"the plan names layers {sorted(plan)}, the model's MoE MLP layers are {sorted(layers)}"
        )
    for name, ids in plan.items():
        experts = layers[name].num_experts
        if not ids or list(ids) != sorted(set(ids)) or not all(0 <= i < experts for i in ids):
            raise ValueError(
                f"plan for {name}: {list(ids)} is not a non-empty sorted subset of 0..{experts - 1}"
            )


def make_manifest(
    cfg: Config, backbone: MoEViT, tasks: Sequence[str], plan: Mapping[str, Sequence[int]], **extra
) -> Manifest:
    """The manifest of `backbone` (built from `cfg`) pruned to `tasks` and `plan`."""
    args = {k: v for k, v in cfg.model.variant_overrides().items() if k != "num_experts"}
    args["moe_layers"] = list(backbone.moe_layer_indices)  # explicit: the keys of the per-block counts
    # Explicit too: a windowed variant default would otherwise be lost if the variant changed. Absent
    # (global attention) keeps the manifests of unwindowed models as they were.
    args.update(backbone.window_args())
    heads = {
        task: {
            "type": cfg.tasks[task].type,
            "num_classes": cfg.tasks[task].num_classes,
            "image_size": cfg.tasks[task].image_size,
            "head_options": dict(cfg.tasks[task].head_options),
        }
        for task in tasks
    }
    kept = {name: [int(i) for i in ids] for name, ids in plan.items()}
    task_experts = pruned_task_experts(backbone, tasks, plan)
    return Manifest(list(tasks), cfg.model.name, args, kept, heads, dict(extra), task_experts)


def prune_state_dict(
    source: Mapping[str, torch.Tensor], target: MultiTaskModel, plan: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The weights of `target` (the pruned architecture) taken from the source model's `source`."""
    out = {}
    for key, like in target.state_dict().items():
        value = _source_value(source, key, plan)
        if value.shape != like.shape:
            raise ValueError(
                f"{key}: the source gives shape {tuple(value.shape)}, the pruned model has {tuple(like.shape)}"
            )
        out[key] = value.clone()
    return out


def _source_value(
    source: Mapping[str, torch.Tensor], key: str, plan: Mapping[str, Sequence[int]]
) -> torch.Tensor:
    name = parse_key(key)
    if name.kind == "expert" and key in source:
        return source[key][list(plan[name.layer])]
    if name.kind == "gate" and is_mlp_layer(name.layer) and key in source:
        rows = source[key].shape[0]  # a restricted task's gate has rows for its first n experts only
        return source[key][[i for i in plan[name.layer] if i < rows]]
    if name.kind == "dense_mlp" and key not in source:  # a single kept expert became a plain MLP
        (expert,) = plan[name.layer]
        return source[expert_key(name.layer, expert_part_of_dense(name.part))][expert]
    if key not in source:
        raise KeyError(f"the source checkpoint has no {key!r}")
    return source[key]


def extract(
    source_state: Mapping[str, torch.Tensor],
    cfg: Config,
    source_backbone: MoEViT,
    tasks: Sequence[str],
    plan: Mapping[str, Sequence[int]],
    **extra: Any,
) -> tuple[MultiTaskModel, Manifest]:
    """The standalone pruned model (eval mode) and its manifest."""
    tasks = check_tasks(tasks, source_backbone.tasks)
    check_plan(plan, source_backbone)
    manifest = make_manifest(cfg, source_backbone, tasks, plan, **extra)
    model = build_from_manifest(manifest)
    model.load_state_dict(prune_state_dict(source_state, model, plan))
    return model.eval(), manifest


def restrict_config(cfg: Config, tasks: Sequence[str]) -> Config:
    """`cfg` with only `tasks` (their data for eval/calibration), no expert parallelism and no
    `continual` section (the manifest, not the config, says which experts each task reaches)."""
    restricted = cfg.only_tasks(list(tasks))
    return dataclasses.replace(
        restricted, parallel=dataclasses.replace(cfg.parallel, ep_size=1), continual=None
    )


def write_pruned(
    out_dir: str | Path, model: MultiTaskModel, manifest: Manifest, cfg: Config, report: dict
) -> Path:
    """Writes manifest.json, model.pt, config.yaml (cfg restricted to the tasks) and report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    save_config(restrict_config(cfg, manifest.tasks), out / "config.yaml")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out, manifest)  # last: a directory with a manifest is complete
    return out
