"""The standalone model directory: one format for every model moevit writes besides training checkpoints
(`moevit prune`, `moevit finetune`'s export, `moevit expand`), and how to build and load it.

    manifest.json   {"format": "moevit-model", "version": 2, "tasks", "model": {"name", "args"},
                     "kept_experts": {"blocks.<i>.mlp": [expert ids]}, "heads": {task: {"type",
                     "num_classes", "image_size", "head_options"}}, "task_experts" (optional):
                     {task: {"blocks.<i>.mlp": n}}, then provenance: "source", "criterion", ... and,
                     for an expanded model, "continual": what `moevit expand` did (see below)}
    model.pt        the model's state_dict (tensors only: `weights_only=True`)
    config.yaml     a training config for it: the source run's restricted to the kept tasks (pruned), or
                    the expanded model's, with its `continual:` section (expanded)
    report.json     parameters / GFLOPs (and metrics, with --eval) before and after (pruned)

The manifest alone rebuilds the architecture: MoEViT gets `num_experts={block: len(kept)}` (a block
keeping one expert becomes a plain MLP, top_k is clamped to the kept count), and the heads are built
from their recorded arguments. `kept_experts` are ids in the model it was cut from (pruned) or its own
(expanded: all of them). `task_experts` names the tasks that route among a layer's first n experts only
(old tasks of a continually expanded model, whose gates never had rows for the experts added later).
Loading needs neither the source checkpoint nor DeepSpeed.

Directories written before the formats were merged (2026-12-06) still load: `moevit-pruned` v1
manifests are read as they are, and `moevit expand`'s `expand.json` (format `moevit-expanded` v1, no
manifest) by `read_continual_record`. tests/fixtures/model_dirs holds one of each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moevit.config.errors import ConfigError
from moevit.heads import build_head
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import is_mlp_layer, mlp_layer_index
from moevit.models.registry import create_model

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "moevit-model"
VERSION = 2
READABLE = {(FORMAT, VERSION), ("moevit-pruned", 1)}  # v1: `moevit prune` before the merge
LEGACY_EXPAND_FILE = "expand.json"  # `moevit expand` before the merge: {"format": "moevit-expanded", ...}
LEGACY_EXPAND_FORMAT = ("moevit-expanded", 1)


class ManifestError(ConfigError):
    """A manifest that cannot describe a model; the message names the file and the field."""

    def __init__(self, source: str | Path, message: str):
        super().__init__(str(source), message)


@dataclass
class Manifest:
    """Args:
    tasks: the tasks the pruned model serves (their routers and heads are kept).
    model_name: registered variant (moevit.models.variants).
    model_args: its constructor overrides, without `tasks` and `num_experts`; `moe_layers` as indices, and
        `window_size` / `global_blocks` whenever the model attends in windows (absent: global attention).
    kept_experts: "blocks.<i>.mlp" -> sorted ids (in the source model) of the experts kept.
    heads: task -> {"type", "num_classes", "image_size", "head_options"}.
    extra: provenance (source checkpoint, criterion, usage source), written as is.
    task_experts: task -> "blocks.<i>.mlp" -> n: the task routes among that layer's first n kept
        experts only; layers and tasks not named route among all kept experts.
    """

    tasks: list[str]
    model_name: str
    model_args: dict[str, Any]
    kept_experts: dict[str, list[int]]
    heads: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    task_experts: dict[str, dict[str, int]] = field(default_factory=dict)

    def experts_per_block(self) -> dict[int, int]:
        return {mlp_layer_index(layer): len(ids) for layer, ids in self.kept_experts.items()}

    def task_experts_per_block(self) -> dict[str, dict[int, int]]:
        return {
            task: {mlp_layer_index(layer): n for layer, n in by_layer.items()}
            for task, by_layer in self.task_experts.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tasks": self.tasks,
            "model": {"name": self.model_name, "args": self.model_args},
            "kept_experts": self.kept_experts,
            "heads": self.heads,
            **({"task_experts": self.task_experts} if self.task_experts else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "<manifest>") -> Manifest:
        """Checks every field a model build relies on; errors name the file and the field."""
        if not isinstance(data, Mapping):
            raise ManifestError(source, "not a JSON object")
        if (data.get("format"), data.get("version")) not in READABLE:
            raise ManifestError(
                source,
                f"'format'/'version' are {data.get('format')!r}/{data.get('version')!r}, "
                f"expected {FORMAT!r}/{VERSION} (a manifest written by moevit)",
            )
        for key in ("tasks", "model", "kept_experts", "heads"):
            if key not in data:
                raise ManifestError(source, f"missing field {key!r}")
        tasks = data["tasks"]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ManifestError(source, f"'tasks' must be a non-empty list of names, got {tasks!r}")
        model = data["model"]
        if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
            raise ManifestError(source, '\'model\' must be {"name": str, "args": {...}}')
        args = dict(model.get("args") or {})
        for reserved in ("tasks", "num_experts"):
            if reserved in args:
                raise ManifestError(
                    source, f"'model.args' must not set {reserved!r} (the manifest decides it)"
                )
        kept = data["kept_experts"]
        if not isinstance(kept, Mapping):
            raise ManifestError(source, "'kept_experts' must map layer names to expert id lists")
        for layer, ids in kept.items():
            if not is_mlp_layer(str(layer)):
                raise ManifestError(source, f"'kept_experts': layer name {layer!r} is not 'blocks.<i>.mlp'")
            if (
                not isinstance(ids, list)
                or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
                or ids != sorted(set(ids))
            ):
                raise ManifestError(
                    source,
                    f"'kept_experts.{layer}' must be a non-empty, sorted list of distinct expert ids, got {ids!r}",
                )
        heads = data["heads"]
        if not isinstance(heads, Mapping) or sorted(heads) != sorted(tasks):
            raise ManifestError(
                source, f"'heads' must describe exactly the tasks {tasks}, got {sorted(heads or {})}"
            )
        for task, head in heads.items():
            missing = [k for k in ("type", "num_classes", "image_size") if k not in head]
            if missing:
                raise ManifestError(source, f"'heads.{task}' lacks {missing}")
        task_experts = _check_task_experts(source, data.get("task_experts") or {}, tasks, kept)
        extra = {
            k: v
            for k, v in data.items()
            if k not in ("format", "version", "tasks", "model", "kept_experts", "heads", "task_experts")
        }
        return cls(
            list(tasks),
            model["name"],
            args,
            {k: list(v) for k, v in kept.items()},
            dict(heads),
            extra,
            task_experts,
        )


def _check_task_experts(
    source: str | Path, value: Any, tasks: list[str], kept: Mapping[str, list[int]]
) -> dict[str, dict[str, int]]:
    if not isinstance(value, Mapping):
        raise ManifestError(source, "'task_experts' must map task names to {layer: n}")
    for task, by_layer in value.items():
        if task not in tasks:
            raise ManifestError(
                source, f"'task_experts' names {task!r}, which is not one of the tasks {tasks}"
            )
        if not isinstance(by_layer, Mapping):
            raise ManifestError(source, f"'task_experts.{task}' must map layer names to expert counts")
        for layer, n in by_layer.items():
            if layer not in kept:
                raise ManifestError(
                    source, f"'task_experts.{task}' names {layer!r}, not a layer of 'kept_experts'"
                )
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(kept[layer]):
                raise ManifestError(
                    source,
                    f"'task_experts.{task}.{layer}' must be a count in [1, {len(kept[layer])}], got {n!r}",
                )
    return {task: dict(by_layer) for task, by_layer in value.items()}


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(directory, f"no {MANIFEST_FILE}: not a model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(path, f"not valid JSON ({err})") from None
    return Manifest.from_dict(data, path)


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def is_pruned_dir(path: str | Path) -> bool:
    """A standalone model directory (pruned, fine-tuned or expanded), as opposed to a run dir."""
    return (Path(path) / MANIFEST_FILE).is_file()


def read_continual_record(directory: str | Path) -> dict[str, Any]:
    """What `moevit expand` recorded in `directory` (frozen_experts, task_experts, train_tasks, ...):
    the manifest's "continual" section, or a legacy `expand.json`. ConfigError naming the directory when
    it holds neither."""
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():
        record = read_manifest(directory).extra.get("continual")
        if not isinstance(record, Mapping):
            raise ManifestError(
                directory / MANIFEST_FILE, "no 'continual' section: not a `moevit expand` output"
            )
        return dict(record)
    path = directory / LEGACY_EXPAND_FILE
    if not path.is_file():
        raise ConfigError(str(directory), f"no {MANIFEST_FILE}: not a complete `moevit expand` output")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(str(path), f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != LEGACY_EXPAND_FORMAT:
        raise ConfigError(str(path), "not a moevit-expanded v1 record (written by `moevit expand`)")
    return data


def build_from_manifest(manifest: Manifest, source: str | Path = "<manifest>") -> MultiTaskModel:
    """The pruned architecture, freshly initialised (load weights into it with `load_pruned`)."""
    try:
        backbone = create_model(
            manifest.model_name,
            tasks=manifest.tasks,
            num_experts=manifest.experts_per_block(),
            task_experts=manifest.task_experts_per_block(),
            **manifest.model_args,
        )
        heads = {
            task: build_head(
                spec["type"],
                spec["num_classes"],
                backbone,
                spec["image_size"],
                **dict(spec.get("head_options") or {}),
            )
            for task, spec in manifest.heads.items()
        }
    except (ValueError, TypeError) as err:
        raise ManifestError(source, f"the model it describes cannot be built: {err}") from None
    return MultiTaskModel(backbone, heads)


def load_pruned(directory: str | Path) -> tuple[MultiTaskModel, Manifest]:
    """The standalone pruned model of a directory written by `moevit prune`, in eval mode, on CPU."""
    manifest = read_manifest(directory)
    model = build_from_manifest(manifest, Path(directory) / MANIFEST_FILE)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ManifestError(directory, f"no {WEIGHTS_FILE} next to the manifest")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ManifestError(
            weights,
            f"weights do not match the manifest's model: missing {missing[:5]}, unexpected {unexpected[:5]}",
        )
    return model.eval(), manifest
