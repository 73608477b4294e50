"""Offline resharding of a checkpoint to another expert-parallel size (and world size), optimizer included.

DeepSpeed writes expert weights per global expert (any ep_size reads them) but the optimizer state per
expert-parallel rank: `expp_rank_<r>_mp_rank_00_optim_states.pt` holds AdamW's state of rank r's
experts and of every dense parameter, and DeepSpeed cannot load it at another ep_size. This module
rewrites a complete checkpoint for ep_size Q and world size W' (`moevit ckpt reshard`):

- dense parameters' optimizer state is the same on every rank (their gradients are averaged over all
  ranks), so rank 0's is given to every new rank;
- each expert's state (exp_avg, exp_avg_sq, step) follows its expert: in an optimizer file the MoE
  parameter groups list, per MoE layer, the rank's local experts in order, each with its parameters in
  registration order (`ExpertMlp`: fc1_weight, fc2_weight, then the biases), weights in the decay group
  and biases in the no-decay group (moevit.parallel.engine.optimizer_param_groups). Without layer decay
  there is one such pair of groups over all MoE layers; with it one pair per MoE layer, told apart by
  their `layer_id` (`moe_group_layouts`). Global expert g = r * E/P + local index. Shapes are checked
  against the per-expert weight files;
- weights, LR schedule and step counters are copied; the MoE groups are renamed `ep_size_<Q>`;
- the per-rank client states are rewritten by the caller's function (the training loop's keys:
  moevit.train.state.reshard_client_states) and written beside the rest.

Only ZeRO stage 0 is supported: ZeRO 1/2 store flat fp32 partitions whose layout depends on the
world size; such checkpoints are refused with a clear error. Every file is read with
`load_tensors_only` (weights_only=True).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moevit.fileio import write_text_atomically
from moevit.models.param_names import split_expert_key
from moevit.parallel.checkpoint import (
    CLIENT_STATE_DIR,
    COMPLETE_FILE,
    POINTER_FILE,
    checkpoint_root,
    is_complete_checkpoint,
    load_tensors_only,
)
from moevit.parallel.setup import expert_group_name

MODEL_FILE = "mp_rank_00_model_states.pt"


def _optimizer_file(ep_rank: int) -> str:
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def _expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


class ReshardError(ValueError):
    """The checkpoint cannot be resharded as asked; the message says why and where."""


@dataclass(frozen=True)
class ExpertLayout:
    """What the per-expert files say: MoE layers, experts per layer, and each expert's parameters."""

    num_layers: int
    num_experts: int
    params: tuple[tuple[str, torch.Size], ...]  # (name, shape) of one expert, in registration order

    def kinds(self) -> list[list[int]]:
        """Positions in `params` of the decay group's parameters (ndim > 1), then of the no-decay one's."""
        decay = [i for i, (_, shape) in enumerate(self.params) if len(shape) > 1]
        no_decay = [i for i, (_, shape) in enumerate(self.params) if len(shape) <= 1]
        return [kind for kind in (decay, no_decay) if kind]


def read_expert_layout(directory: Path, num_layers: int) -> ExpertLayout:
    counts = []
    params: tuple[tuple[str, torch.Size], ...] | None = None
    for layer in range(num_layers):
        files = sorted(directory.glob(f"layer_{layer}_expert_*_mp_rank_00_model_states.pt"))
        counts.append(len(files))
        state = load_tensors_only(directory / _expert_file(layer, 0))
        layer_params = tuple((split_expert_key(key)[2], tensor.shape) for key, tensor in state.items())
        if params is not None and layer_params != params:
            raise ReshardError(
                f"{directory}: MoE layer {layer}'s experts differ from layer 0's ({layer_params})"
            )
        params = layer_params
    if not counts or len(set(counts)) != 1 or counts[0] == 0:
        raise ReshardError(
            f"{directory}: expected the same number of expert files per MoE layer, got {counts}"
        )
    return ExpertLayout(num_layers, counts[0], params)


@dataclass(frozen=True)
class MoeGroupLayout:
    """What one MoE optimizer group holds: per MoE layer in `layers` (ordinals of the expert files), per
    local expert, the expert's parameters at positions `kind` of ExpertLayout.params."""

    layers: tuple[int, ...]
    kind: tuple[int, ...]


def moe_group_layouts(groups: list[dict], layout: ExpertLayout, where: Path) -> dict[int, MoeGroupLayout]:
    """{index of each MoE group in `groups`: what it holds}.

    Without layer decay the expert groups are one per kind (decay, no decay), each over every MoE
    layer. With layer decay each group carries its `layer_id` (the block's layer, see
    moevit.parallel.engine.optimizer_param_groups) and holds one MoE layer's experts: the distinct
    layer_ids, in increasing order, are the MoE layers in the order of the expert files. Within one
    layer_id (or all, without) the groups come decaying kind first, as `layout.kinds()` lists them.
    """
    by_layer: dict[int | None, list[int]] = {}
    for index, group in enumerate(groups):
        if group.get("moe"):
            by_layer.setdefault(group.get("layer_id"), []).append(index)
    layer_ids = sorted(key for key in by_layer if key is not None)
    if layer_ids and (None in by_layer or len(layer_ids) != layout.num_layers):
        raise ReshardError(
            f"{where}: the MoE optimizer groups cover layer_ids {layer_ids}"
            f"{' and all layers' if None in by_layer else ''}, the expert files {layout.num_layers} MoE layers"
        )
    kinds = layout.kinds()
    result = {}
    for layer_id, indices in by_layer.items():
        if len(indices) != len(kinds):
            raise ReshardError(
                f"{where}: {len(indices)} MoE optimizer groups"
                f"{'' if layer_id is None else f' with layer_id {layer_id}'}, expected {len(kinds)} "
                "(decay and no-decay expert parameters)"
            )
        layers = tuple(range(layout.num_layers)) if layer_id is None else (layer_ids.index(layer_id),)
        for index, kind in zip(indices, kinds):
            result[index] = MoeGroupLayout(layers, tuple(kind))
    return result


def reshard_optimizer(
    old: list[dict], layout: ExpertLayout, old_ep: int, new_ep: int, where: Path
) -> list[dict]:
    """The optimizer state dict of every new expert-parallel rank, from those of every old one."""
    local_old, local_new = layout.num_experts // old_ep, layout.num_experts // new_ep
    experts: dict[tuple[int, int, int], dict] = {}
    reference_groups = old[0]["param_groups"]
    moe_groups = moe_group_layouts(reference_groups, layout, where)
    for rank, optimizer in enumerate(old):
        groups, state = optimizer["param_groups"], optimizer["state"]
        if moe_group_layouts(groups, layout, where) != moe_groups:
            raise ReshardError(f"{where}: rank {rank}'s optimizer groups differ from rank 0's")
        for group_index, held in moe_groups.items():
            group, per_layer = groups[group_index], local_old * len(held.kind)
            expected = len(held.layers) * per_layer
            if len(group["params"]) != expected:
                raise ReshardError(
                    f"{where}: rank {rank}'s MoE group {group_index} has {len(group['params'])} parameters, "
                    f"expected {expected} ({len(held.layers)} layers x {local_old} experts x {len(held.kind)})"
                )
            for position, index in enumerate(group["params"]):
                layer_position, rest = divmod(position, per_layer)
                local, k = divmod(rest, len(held.kind))
                layer, param = held.layers[layer_position], held.kind[k]
                if index in state:
                    name, shape = layout.params[param]
                    saved_shape = state[index]["exp_avg"].shape if "exp_avg" in state[index] else shape
                    if saved_shape != shape:
                        raise ReshardError(
                            f"{where}: optimizer state of {name} (layer {layer}) is {tuple(saved_shape)}, "
                            f"the expert file says {tuple(shape)}"
                        )
                    experts[layer, rank * local_old + local, param] = state[index]

    new_states = []
    for new_rank in range(new_ep):
        groups, state, next_index = [], {}, 0
        for group_index, group in enumerate(reference_groups):
            new_group = {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}
            params = []
            held = moe_groups.get(group_index)
            if held is None:
                for index in group["params"]:
                    if index in old[0]["state"]:
                        state[next_index] = old[0]["state"][index]
                    params.append(next_index)
                    next_index += 1
            else:
                new_group["name"] = expert_group_name(new_ep)
                for layer in held.layers:
                    for local in range(local_new):
                        for param in held.kind:
                            key = (layer, new_rank * local_new + local, param)
                            if key in experts:
                                state[next_index] = experts[key]
                            params.append(next_index)
                            next_index += 1
            new_group["params"] = params
            groups.append(new_group)
        new_states.append({"state": state, "param_groups": groups})
    return new_states


ClientStateResharder = Callable[[list[dict], int], tuple[list[dict], list[str]]]


def reshard_checkpoint(
    checkpoint: str | os.PathLike,
    ep_size: int,
    out_run_dir: str | os.PathLike,
    reshard_client_states: ClientStateResharder,
    world_size: int | None = None,
) -> tuple[Path, list[str]]:
    """Writes the checkpoint directory `checkpoint` (moevit.artifacts.checkpoints resolves a run dir to
    one) resharded for `ep_size` (and `world_size`, default ep_size) as the newest
    checkpoint of the run dir `out_run_dir`; returns its directory and notes on inexact parts.

    The per-rank client states are the training loop's (their keys are its business, not this
    package's): `reshard_client_states(old states, new world size)` returns the new ones and notes
    (moevit.train.state.reshard_client_states).

    Resume from it with `moevit train CONFIG parallel.ep_size=<ep_size> --nproc <world_size> --resume OUT`.
    """
    source = Path(checkpoint)
    if not is_complete_checkpoint(source):
        raise ReshardError(f"{source} is not a complete checkpoint directory")
    marker = json.loads((source / COMPLETE_FILE).read_text())
    world_size = world_size or ep_size
    if ep_size < 1 or world_size % ep_size:
        raise ReshardError(f"--ep-size {ep_size} must be >= 1 and divide the world size {world_size}")
    if marker.get("zero_stage", 0) != 0 or list(source.glob("zero_pp_rank_*_optim_states.pt")):
        raise ReshardError(
            f"{source} was saved with ZeRO stage {marker.get('zero_stage', '1 or 2')}: its optimizer state is "
            "flat fp32 partitions laid out for that world size; resharding supports parallel.zero_stage=0 only"
        )
    model_state = load_tensors_only(source / MODEL_FILE)
    num_layers = len(model_state["num_experts"])
    layout = read_expert_layout(source, num_layers)
    if layout.num_experts % ep_size:
        raise ReshardError(
            f"--ep-size {ep_size} does not divide the {layout.num_experts} experts per MoE layer"
        )
    old_ep, old_world = marker["ep_size"], marker["world_size"]
    old_optimizers = [load_tensors_only(source / _optimizer_file(r))["optimizer"] for r in range(old_ep)]
    new_optimizers = reshard_optimizer(old_optimizers, layout, old_ep, ep_size, source)
    client_dir = source / CLIENT_STATE_DIR
    old_clients = [json.loads((client_dir / f"rank_{r:05d}.json").read_text()) for r in range(old_world)]
    new_clients, notes = reshard_client_states(old_clients, world_size)

    root = checkpoint_root(out_run_dir)
    target = root / source.name
    if target.exists():
        raise ReshardError(f"{target} already exists; choose another --out")
    staging = root / f".{source.name}.resharding"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / CLIENT_STATE_DIR).mkdir(parents=True)
    for path in source.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        shutil.copy2(path, staging / path.name)
    model_state["optimizer"] = new_optimizers[0]  # DeepSpeed reads the expp files; kept consistent anyway
    model_state["dp_world_size"] = world_size
    torch.save(model_state, staging / MODEL_FILE)
    for rank, optimizer in enumerate(new_optimizers):
        torch.save({"optimizer": optimizer}, staging / _optimizer_file(rank))
    for rank, client in enumerate(new_clients):
        write_text_atomically(staging / CLIENT_STATE_DIR / f"rank_{rank:05d}.json", json.dumps(client))
    new_marker = {
        **marker,
        "world_size": world_size,
        "ep_size": ep_size,
        "zero_stage": 0,
        "resharded_from": {"checkpoint": str(source), "world_size": old_world, "ep_size": old_ep},
    }
    write_text_atomically(staging / COMPLETE_FILE, json.dumps(new_marker))
    os.replace(staging, target)
    write_text_atomically(root / POINTER_FILE, target.name)
    return target, notes


def summarize(target: Path, notes: list[str]) -> str:
    marker = json.loads((target / COMPLETE_FILE).read_text())
    old = marker["resharded_from"]
    lines = [
        f"resharded {old['checkpoint']} (world size {old['world_size']}, ep_size {old['ep_size']})",
        f"       -> {target} (world size {marker['world_size']}, ep_size {marker['ep_size']})",
        *(f"note: {note}" for note in notes),
    ]
    return "\n".join(lines)
