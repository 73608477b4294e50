"""`model.init`: the one loader that starts a model from weights on disk (issue 16).

A source is a local path (no hub downloads) of one of these kinds:

    timm          a dense timm ViT file (.pth / .pt / .bin / .safetensors / .npz, as timm reads them;
                  an MAE `.pth` is one: `{"model": encoder state}`), upcycled: each expert of an MoE
                  block starts as that block's dense MLP (moevit.models.pretrained), plus optional noise;
    moevit-run    a run dir (its newest complete checkpoint) or `<run>/checkpoints/<tag>`;
    moevit-model  a standalone model dir (`moevit prune`, `finetune`'s export, `moevit expand`): model.pt.

A moevit source with dense MLPs where the model's blocks are MoE (a dense run, such as
`moevit demo model.moe.layers=none`) is upcycled as a timm file is, without noise unless asked.

Every tensor whose name the model has loads; its shape must match, except the position embedding,
which is resampled to the model's grid (timm's `resample_abs_pos_embed`), and, from a moevit source,
heads whose shapes differ (another class count), which keep their fresh initialisation. Any other
shape mismatch is refused naming the tensor. What did not load is listed, never hidden: `missing`
(the model's tensors the source lacks: new gates, heads, task embeddings) and `unexpected` (the
source's tensors the model lacks: a classifier head, MAE's decoder and mask token, other tasks'
gates). `strict` (continual learning's start) refuses anything but an exact, key-by-key load.
Files are read tensors only (`weights_only`), as checkpoints are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from moevit.artifacts.checkpoints import resolve_checkpoint
from moevit.artifacts.model_dir import WEIGHTS_FILE
from moevit.artifacts.run_dir import RunDir
from moevit.config.errors import ConfigError
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import BACKBONE, parse_key
from moevit.models.pretrained import DENSE_SUFFIXES, add_expert_noise, read_dense_state, upcycled_state
from moevit.parallel.checkpoint import consolidated_state_dict, load_tensors_only

REPORT_FILE = "init_report.json"


@dataclass
class InitReport:
    """What `apply_init` did: written to `<run>/init_report.json`, summarised in the log."""

    source: str
    kind: str  # "timm", "moevit-run" or "moevit-model"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model's tensors left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # the source's tensors the model has no place for
    upcycled: list[str] = field(default_factory=list)  # expert tensors copied from a dense MLP
    resampled: dict[str, list[list[int]]] = field(default_factory=dict)  # key -> [source shape, shape]
    skipped: dict[str, list[list[int]]] = field(default_factory=dict)  # heads of another shape, kept fresh
    expert_noise: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded", f"{len(self.missing)} missing"]
        parts.append(f"{len(self.unexpected)} unexpected")
        if self.upcycled:
            noise = f", noise {self.expert_noise:g}" if self.expert_noise else ""
            parts.append(f"{len(self.upcycled)} expert tensors upcycled from dense MLPs{noise}")
        for key, (old, new) in self.resampled.items():
            parts.append(f"{key} resampled {old} -> {new}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} head tensors of another shape skipped")
        return f"model.init {self.source} ({self.kind}): " + ", ".join(parts)


def read_init_state(
    path: str | Path, backbone, flag: str = "model.init"
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(state in MultiTaskModel names, source kind, upcycled expert keys) of the source `path`.

    `backbone` (the MoEViT to fill) decides how a dense MLP upcycles and the shape an `.npz` is read
    into. Every failure is a ConfigError naming `flag` and the path.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if not path.exists():
        raise ConfigError(where, "no such file or directory (local paths only: nothing is downloaded)")
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            state, upcycled = _upcycled_backbone(
                _read(where, lambda: load_tensors_only(path / WEIGHTS_FILE)), backbone
            )
            return state, "moevit-model", upcycled
        if not (RunDir(path).checkpoints.is_dir() or path.parent.name == RunDir(Path()).checkpoints.name):
            raise ConfigError(
                where, f"a directory that is neither a model dir (no {WEIGHTS_FILE}) nor a moevit run dir"
            )
        ref = resolve_checkpoint(path, flag)
        state, upcycled = _upcycled_backbone(
            _read(where, lambda: consolidated_state_dict(ref.directory)), backbone
        )
        return state, "moevit-run", upcycled
    if path.suffix not in DENSE_SUFFIXES:
        raise ConfigError(
            where, f"unknown file type {path.suffix!r}: a timm ViT file is one of {', '.join(DENSE_SUFFIXES)}"
        )
    dense = _read(where, lambda: read_dense_state(path, backbone))
    state, upcycled = upcycled_state(dense, backbone)
    return {BACKBONE + key: value for key, value in state.items()}, "timm", [BACKBONE + k for k in upcycled]


def _upcycled_backbone(state: dict[str, torch.Tensor], backbone) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A moevit source's state with its dense MLPs upcycled where the model's block is MoE (a dense run,
    e.g. `moevit demo model.moe.layers=none`, starts every expert of the block); a source whose blocks
    match the model's comes back unchanged, with no key upcycled."""
    dense = {key[len(BACKBONE) :]: value for key, value in state.items() if key.startswith(BACKBONE)}
    rest = {key: value for key, value in state.items() if not key.startswith(BACKBONE)}
    upcycled_backbone, upcycled = upcycled_state(dense, backbone)
    return (
        {**rest, **{BACKBONE + key: value for key, value in upcycled_backbone.items()}},
        [BACKBONE + key for key in upcycled],
    )


def _read(where: str, reader):
    """The reader's result; any failure of a bad or tampered file becomes one line naming the path."""
    try:
        state = reader()
    except ConfigError:
        raise
    except Exception as err:  # torch, safetensors, numpy and timm each raise their own types
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(where, f"cannot read it: {lines[0] if lines else type(err).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(where, "cannot read it: it holds no state_dict of tensors")
    return state


def apply_init(
    model: MultiTaskModel,
    path: str | Path,
    expert_noise: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    flag: str = "model.init",
) -> InitReport:
    """Loads the source `path` into `model` (in place) and returns the report.

    Args:
        model: the single-device model, before any parallel wrapping (every rank calls this alike).
        expert_noise: upcycled experts get N(0, (expert_noise x the dense weight's std)^2) added to
            their weight matrices (dense sources only), drawn from a generator seeded with `seed`.
        strict: every tensor must load as it is: no missing, unexpected, resampled, skipped or
            upcycled tensor.
        flag: the config key or CLI flag named in errors.
    """
    state, kind, upcycled = read_init_state(path, model.backbone, flag)
    if strict and upcycled:
        raise ConfigError(
            f"{flag} {path}",
            f"the weights do not fit the config's model exactly: dense MLPs would be upcycled into {upcycled[:3]}",
        )
    if upcycled and expert_noise:
        add_expert_noise(state, upcycled, expert_noise, torch.Generator().manual_seed(seed))
    report = fit_state(model, state, f"{flag} {path}", kind, strict)
    report.source, report.upcycled = str(path), upcycled
    report.expert_noise = expert_noise if upcycled else 0.0
    return report


def fit_state(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    kind: str = "moevit-model",
    strict: bool = False,
    prefix: str = BACKBONE,
) -> InitReport:
    """Loads `state` into `module` (a MultiTaskModel; with `prefix` "", a bare MoEViT) by name and shape,
    the rules of the module doc; returns the report. Nothing is loaded when a tensor is refused.

    `where` opens every error (the flag and the path); `kind` "timm" (a dense source) has no heads to
    skip: a head tensor of another shape is then an error like any other."""
    backbone = module.backbone if prefix else module
    pos_embed = prefix + "pos_embed"
    report = InitReport(where, kind)
    target = module.state_dict()
    fitted = {}
    for key, value in state.items():
        name = parse_key(key, prefix)
        if name.kind == "gate_usage":  # counters older files hold; loading drops them anyway
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        expected = target[key].shape
        if value.shape != expected:
            if key == pos_embed and value.ndim == 3 and value.shape[-1] == expected[-1]:
                report.resampled[key] = [list(value.shape), list(expected)]
                value = _resampled_pos_embed(value, backbone)
            elif name.kind == "head" and kind != "timm":
                report.skipped[key] = [list(value.shape), list(expected)]
                continue
            else:
                raise ConfigError(
                    where, f"tensor {key} has shape {list(value.shape)}, the model expects {list(expected)}"
                )
        fitted[key] = value.to(target[key].dtype)
    for key in target:  # files from before 2026-12-07 have no selection biases: zeros, plain top-k
        name = parse_key(key, prefix)
        if name.kind == "gate" and name.part == "selection_bias" and key not in state:
            if key.removesuffix("selection_bias") + "weight" in fitted:
                fitted[key] = torch.zeros_like(target[key])
    report.loaded = list(fitted)
    report.missing = [key for key in target if key not in fitted]
    if strict:
        _check_exact(where, report)
    module.load_state_dict(fitted, strict=False)
    return report


def _resampled_pos_embed(value: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """The source's position embedding on the backbone's patch grid (prefix tokens kept as they are)."""
    prefix = backbone.num_prefix_tokens
    grid = list(backbone.patch_embed.grid_size)
    return resample_abs_pos_embed(value.float(), new_size=grid, num_prefix_tokens=prefix)


def _check_exact(where: str, report: InitReport) -> None:
    problems = {
        "missing": report.missing,
        "unexpected": report.unexpected,
        "resampled": list(report.resampled),
        "of another shape": list(report.skipped),
    }
    found = [f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in problems.items() if keys]
    if found:
        raise ConfigError(where, f"the weights do not fit the config's model exactly: {'; '.join(found)}")


def write_init_report(run_root: str | Path, report: InitReport) -> Path:
    path = Path(run_root) / REPORT_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path
