"""One expansion, end to end: source checkpoint -> expanded config and weights -> checks -> DIR."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from moevit.artifacts.model_dir import CONFIG_FILE, WEIGHTS_FILE, write_manifest
from moevit.config import save_config
from moevit.config.errors import ConfigError
from moevit.continual.expand import (
    build_expanded,
    check_old_tasks_unchanged,
    expanded_config,
    experts_per_layer,
    new_task_config,
)
from moevit.continual.freeze import freeze_for_continual
from moevit.prune.extract import make_manifest
from moevit.prune.source import gather_usage, load_source


def read_settings(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--settings {path}", f"cannot read it: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--settings {path}", "not a YAML mapping")
    return data


def run_expand(
    checkpoint: str,
    task: str,
    head: str,
    num_classes: int,
    new_experts: int,
    out_dir: str | Path,
    expert_init: str = "copy",
    data_root: str | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    config: str | None = None,
    overrides: Sequence[str] = (),
    settings: str | Path | None = None,
) -> dict[str, Any]:
    """Expands `checkpoint` by `task` and `new_experts` experts per MoE MLP layer; writes `out_dir`.

    `settings`: a YAML file whose training sections (train, aux_loss, parallel, output_dir, seed) are
    merged into the written config before the dotted `overrides`.
    """
    extra = read_settings(settings) if settings is not None else None
    source = load_source(checkpoint, config)
    old_experts = experts_per_layer(source.model)
    size = image_size or source.model.backbone.patch_embed.img_size[0]
    task_cfg = new_task_config(head, num_classes, data_root, size, batch_size)
    cfg = expanded_config(source.cfg, old_experts, task, task_cfg, new_experts, out_dir, overrides, extra)

    usage, usage_origin = None, None
    if expert_init == "copy":
        # The run's counters when it kept them for every old task, else a calibration pass.
        usage, usage_origin = gather_usage(source, list(source.cfg.tasks), mode="auto")
    model, copied_from = build_expanded(
        cfg, source.model, source.state, task, new_experts, expert_init, usage
    )
    image_sizes = {name: t.data.image_size if t.data else size for name, t in source.cfg.tasks.items()}
    check_old_tasks_unchanged(source.model, model, image_sizes)
    counts = freeze_for_continual(model, [task], old_experts)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    save_config(cfg, out / CONFIG_FILE)
    record = {
        "source_checkpoint": source.description,
        "new_task": task,
        "head": head,
        "num_classes": num_classes,
        "old_tasks": list(source.cfg.tasks),
        "experts_before": old_experts,
        "experts_after": old_experts + new_experts,
        "expert_init": expert_init,
        "copied_from": copied_from,
        "usage_source": usage_origin,
        "task_experts": dict(cfg.continual.task_experts),
        "frozen_experts": cfg.continual.frozen_experts,
        "train_tasks": list(cfg.continual.train_tasks),
        "params_trainable": counts["trainable"],
        "params_total": counts["total"],
        "old_tasks_bit_identical": "checked on a random batch: tokens, feature maps, routing",
    }
    # The standalone model-directory format (moevit.artifacts.model_dir): every expert kept, the old
    # tasks restricted to the experts they had; what was done goes in its "continual" section.
    every_expert = {
        name: list(range(layer.num_experts)) for name, layer in model.backbone.mlp_layers().items()
    }
    manifest = make_manifest(cfg, model.backbone, list(cfg.tasks), every_expert, continual=record)
    write_manifest(out, manifest)  # last: a directory with a manifest is complete
    return record
