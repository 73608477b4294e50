"""MoEViT's state-dict names: the one place that knows how parameters and buffers are called.

Pruning, continual learning, fine-tuning and upcycling all rewrite state dicts key by key (slice the
experts a task keeps, copy experts, rename a task's gate, turn a dense MLP into experts). They ask this
module what a key is and how to spell one, in the manner of timm's `checkpoint_filter_fn` and
torchtitan's state-dict adapters, so renaming a module here (say `router.gates`) breaks
tests/unit/test_param_names.py, not pruning at run time.

Names of a bare `MoEViT` carry no prefix; those of a `MultiTaskModel` carry `backbone.` (its heads are
`heads.<task>.`). Every function takes the prefix, `BACKBONE` by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

BACKBONE = "backbone."  # MultiTaskModel's name for its MoEViT

Kind = Literal["expert", "gate", "gate_usage", "task_embedding", "dense_mlp", "head", "other"]

_MLP_LAYER = re.compile(r"blocks\.(\d+)\.mlp")
_BACKBONE_PATTERNS: tuple[tuple[Kind, re.Pattern], ...] = (
    ("expert", re.compile(r"(?P<layer>blocks\.\d+\.mlp)\.experts\.(?P<part>fc[12]_(?:weight|bias))")),
    ("gate", re.compile(r"(?P<layer>.+)\.router\.gates\.(?P<task>[^.]+)\.(?P<part>weight|selection_bias)")),
    ("gate_usage", re.compile(r"(?P<layer>.+)\.router\.gates\.(?P<task>[^.]+)\.usage")),
    ("task_embedding", re.compile(r"task_embed\.(?P<task>[^.]+)")),
    ("dense_mlp", re.compile(r"(?P<layer>blocks\.\d+\.mlp)\.(?P<part>fc[12]\.(?:weight|bias))")),
)
_HEAD = re.compile(r"heads\.(?P<task>[^.]+)\..+")


@dataclass(frozen=True)
class ParamName:
    """What one state-dict key names.

    kind: expert (stacked (E, ...) tensor of an MoE MLP), gate (a task's router weight or its per-expert
        selection bias, both one row per expert the task reaches), gate_usage (the
        int64 usage counter gates held in files written before 2026-12-06, which loading drops),
        task_embedding, dense_mlp (a plain MLP's linear), head, or other.
    layer: the module that holds it, unprefixed (`blocks.3.mlp`, `blocks.1.attn`), for experts, gates
        and dense MLPs.
    task: the task it belongs to, for gates, usage counters, task embeddings and heads.
    part: `fc1_weight`, ... for experts; `fc1.weight`, ... for dense MLPs; `weight` or `selection_bias`
        for gates.
    """

    kind: Kind
    layer: str | None = None
    task: str | None = None
    part: str | None = None


def parse_key(key: str, prefix: str = BACKBONE) -> ParamName:
    """What `key` (of a MultiTaskModel with the default prefix; of a MoEViT with prefix "") names."""
    if prefix and not key.startswith(prefix):
        head = _HEAD.fullmatch(key)
        return ParamName("head", task=head["task"]) if head else ParamName("other")
    name = key[len(prefix) :]
    for kind, pattern in _BACKBONE_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            groups = match.groupdict()
            return ParamName(kind, groups.get("layer"), groups.get("task"), groups.get("part"))
    return ParamName("other")


def task_of(key: str, prefix: str = BACKBONE) -> str | None:
    """The task a key belongs to (its gate, usage counter, task embedding or head); None when shared."""
    return parse_key(key, prefix).task


def expert_key(layer: str, part: str, prefix: str = BACKBONE) -> str:
    """The stacked expert tensor `part` (`fc1_weight`, ...) of MoE MLP `layer`."""
    return f"{prefix}{layer}.experts.{part}"


def expert_part_of_dense(dense_part: str) -> str:
    """The expert tensor a dense MLP's linear becomes: `fc1.weight` -> `fc1_weight`."""
    return dense_part.replace(".", "_")


def with_task(key: str, new_task: str, prefix: str = BACKBONE) -> str:
    """`key` of a gate, usage counter or task embedding, renamed to belong to `new_task`."""
    name = parse_key(key, prefix)
    if name.kind not in ("gate", "gate_usage", "task_embedding"):
        raise ValueError(f"{key!r} belongs to no task's router or embedding")
    if name.kind == "task_embedding":
        return f"{prefix}task_embed.{new_task}"
    suffix = f".{name.part}" if name.kind == "gate" else ".usage"
    return f"{prefix}{name.layer}.router.gates.{new_task}{suffix}"


# The expert-parallel wrapper (moevit.parallel.expert_parallel) holds each expert of a stacked tensor as
# one module of DeepSpeed's MoE layer, whose checkpoint code finds expert tensors by this infix
# (deepspeed engine.py, _save_moe_checkpoint): `<module>.deepspeed_moe.experts.deepspeed_experts.<e>.<part>`.
PER_EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
_PER_EXPERT = re.compile(rf"(?P<prefix>.+){re.escape(PER_EXPERT_INFIX)}(?P<index>\d+)\.(?P<part>\w+)")


def split_expert_key(key: str) -> tuple[str, int, str] | None:
    """(module prefix, expert index, part) of a per-expert key of the expert-parallel model; None for
    any other key."""
    match = _PER_EXPERT.fullmatch(key)
    return None if match is None else (match["prefix"], int(match["index"]), match["part"])


def is_mlp_layer(layer: str) -> bool:
    """`blocks.<i>.mlp`: an MoE MLP layer (the attention experts' routers live in `blocks.<i>.attn`)."""
    return _MLP_LAYER.fullmatch(layer) is not None


def mlp_layer_index(layer: str) -> int:
    """The block index of MLP layer `blocks.<i>.mlp`; ValueError for any other name."""
    match = _MLP_LAYER.fullmatch(layer)
    if match is None:
        raise ValueError(f"{layer!r} is not an MLP layer name (blocks.<i>.mlp)")
    return int(match[1])


def mlp_layer_name(index: int) -> str:
    return f"blocks.{index}.mlp"


# Layer-wise lr decay (BEiT, Bao et al. 2022; timm's `param_groups_layer_decay`; moevit.parallel.engine)
# numbers a ViT from the input: what enters before the first block is layer 0, block i is layer i + 1,
# and what follows the last block (final norm, heads) is layer depth + 1, the top, at the full lr.
_STEM = re.compile(r"(?:cls_token|pos_embed|patch_embed\..+|task_embed\.[^.]+)")
_IN_BLOCK = re.compile(r"blocks\.(\d+)\..+")
_AFTER_BLOCKS = re.compile(r"norm\..+")


def decay_layer(key: str, depth: int, prefix: str = BACKBONE) -> int:
    """The layer-decay layer of parameter `key` of a model with `depth` blocks: 0 for the embeddings
    (patch, position, class token and task embeddings, which all act on the input tokens), i + 1 for
    anything in block i (its gates and experts included), depth + 1 for the final norm and for every
    parameter outside the backbone (the heads). ValueError for a backbone parameter of no known place,
    so that a new one gets a deliberate layer instead of a silent default."""
    if prefix and not key.startswith(prefix):
        return depth + 1
    name = key[len(prefix) :]
    if _STEM.fullmatch(name):
        return 0
    block = _IN_BLOCK.fullmatch(name)
    if block:
        return int(block[1]) + 1
    if _AFTER_BLOCKS.fullmatch(name):
        return depth + 1
    raise ValueError(
        f"{key!r}: no layer-decay layer for this backbone parameter (moevit.models.param_names.decay_layer)"
    )
