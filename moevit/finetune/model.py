"""The model a fine-tuning starts from, and what it trains.

The backbone comes from a pruned directory (`moevit prune`) or, for the unpruned baseline, from a
training checkpoint (every expert kept). One of its tasks (`from_task`) hands its routers and task
embedding to the downstream task, which is renamed to the fine-tuning config's task name (Mod-Squad
renames the pruned task's gates and head the same way); the head is new (the classes are new).

Modes (`freeze`): "head" trains the head only; "router+head" also the task's gates and task embedding;
"full" everything. Frozen parameters get requires_grad False, so the engine leaves them out of the
optimizer (moevit.parallel.engine.optimizer_param_groups): no update, no weight decay, no moments.
"""

from __future__ import annotations

import torch

from moevit.artifacts.init import fit_state
from moevit.artifacts.model_dir import Manifest, is_pruned_dir, load_pruned
from moevit.config.schema import Config
from moevit.heads import build_head
from moevit.models.moe_vit import MoEViT
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import parse_key, task_of, with_task
from moevit.models.registry import create_model

MODES = ("head", "router+head", "full")


def init_source(init: str, from_task: str | None) -> tuple[MultiTaskModel, Manifest, str]:
    """(model, manifest, task whose routers are reused) of a pruned dir or a training checkpoint."""
    if is_pruned_dir(init):
        model, manifest = load_pruned(init)
    else:  # the unpruned baseline: a training checkpoint, every expert kept
        from moevit.prune.run import prune_to
        from moevit.prune.source import load_source

        source = load_source(init)
        keep_all = {
            name: list(range(layer.num_experts)) for name, layer in source.model.backbone.mlp_layers().items()
        }
        model, manifest = prune_to(
            source, list(source.model.tasks), keep_all, source_checkpoint=source.description
        )
    if from_task is None:
        if len(manifest.tasks) > 1:
            raise ValueError(
                f"--init {init} serves {manifest.tasks}: choose the routers to reuse with --from-task"
            )
        from_task = manifest.tasks[0]
    if from_task not in manifest.tasks:
        raise ValueError(f"--from-task {from_task!r} is not a task of --init {init} ({manifest.tasks})")
    return model, manifest, from_task


def renamed_backbone(
    model: MultiTaskModel, manifest: Manifest, from_task: str, new_task: str, where: str = "--init"
) -> MoEViT:
    """A one-task backbone whose routers and task embedding are `from_task`'s, under the name `new_task`."""
    backbone = create_model(
        manifest.model_name, tasks=[new_task], num_experts=manifest.experts_per_block(), **manifest.model_args
    )
    state = {}
    for key, value in model.backbone.state_dict().items():
        task = task_of(key, prefix="")
        if task is not None and task != from_task:
            continue
        state[key if task is None else with_task(key, new_task, prefix="")] = value
    # model.init's loader (moevit.artifacts.init), strict: every tensor by name and shape, as it is.
    fit_state(backbone, state, where, strict=True, prefix="")
    return backbone


def build_finetune_model(cfg: Config, init: str, from_task: str | None) -> tuple[MultiTaskModel, Manifest]:
    """The downstream model (backbone from `init`, new head for the config's single task) and its manifest."""
    if len(cfg.tasks) != 1:
        raise ValueError(f"fine-tuning trains one task; the config has {list(cfg.tasks)}")
    ((task, task_cfg),) = cfg.tasks.items()
    source_model, manifest, from_task = init_source(init, from_task)
    backbone = renamed_backbone(source_model, manifest, from_task, task, f"--init {init}")
    image_size = task_cfg.image_size
    torch.manual_seed(cfg.seed)
    head = build_head(task_cfg.type, task_cfg.num_classes, backbone, image_size, **task_cfg.head_options)
    spec = {
        "type": task_cfg.type,
        "num_classes": task_cfg.num_classes,
        "image_size": image_size,
        "head_options": dict(task_cfg.head_options),
    }
    out_manifest = Manifest(
        [task],
        manifest.model_name,
        manifest.model_args,
        manifest.kept_experts,
        {task: spec},
        {"finetuned_from": {"init": str(init), "task": from_task}},
    )
    return MultiTaskModel(backbone, {task: head}), out_manifest


def freeze(model: MultiTaskModel, mode: str) -> dict[str, int]:
    """Sets requires_grad for `mode`; returns {"trainable", "total"} parameter counts."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    for name, param in model.named_parameters():
        if mode == "full" or name.startswith("heads."):
            param.requires_grad_(True)
        else:
            routing = parse_key(name).kind in ("gate", "task_embedding")
            param.requires_grad_(mode == "router+head" and routing)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
