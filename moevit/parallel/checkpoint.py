"""Checkpoints: DeepSpeed's engine state plus per-rank client state, committed atomically.

Layout under `<run_dir>/checkpoints/`:

    latest                      tag of the newest complete checkpoint (DeepSpeed's pointer name)
    step_00000100/              one tag per optimizer step
        mp_rank_00_model_states.pt                     dense weights, LR schedule, engine counters
        layer_<l>_expert_<g>_mp_rank_00_model_states.pt  one file per MoE layer and global expert
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt    ZeRO 1/2 optimizer partitions, or
        expp_rank_<r>_mp_rank_00_optim_states.pt       the optimizer without ZeRO
        client_state/rank_<r>.json                     this rank's loop state (sampler, RNG, step)
        complete.json                                  written once every rank finished

Commit protocol, so that a crash mid-save leaves the previous checkpoint usable: every rank
writes its files, a barrier, rank 0 writes `complete.json`, then replaces `latest` (temporary
file + `os.replace`, atomic on POSIX), and only then deletes older checkpoints beyond the
newest `keep_last` (and older interrupted saves). A directory without `complete.json` is never
read, and `latest` never names one.
DeepSpeed's own `latest` write is turned off (`save_latest=False`): it happens before the
final barrier, while other ranks may still be writing.

Client state is JSON (one file per rank, because RNG and sampler state differ per rank),
never pickled. Every `.pt` file is read with `torch.load(weights_only=True)`: tensors, containers and
plain scalars only, so a tampered file carrying a pickle payload (an object whose `__reduce__` runs
code) is refused with `UnsafeCheckpointError` naming the file. DeepSpeed's own loader unpickles
(`weights_only=False`), so `load_checkpoint` swaps the engine's checkpoint engine for
`WeightsOnlyCheckpointEngine` first; DeepSpeed reads every checkpoint file through it. DeepSpeed saves neither RNG nor data-loader state, hence `capture_rng_state`.
Optimizer state is per rank and tied to the world size and ep_size it was saved with;
loading checks both (`moevit ckpt reshard`, moevit.parallel.reshard, converts a checkpoint to another
ep_size).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from moevit.faults import maybe_kill_in_checkpoint
from moevit.fileio import UnsafeCheckpointError, write_text_atomically
from moevit.models.param_names import split_expert_key
from moevit.parallel import collectives
from moevit.parallel.expert_parallel import ExpertParallelExperts

POINTER_FILE = "latest"
COMPLETE_FILE = "complete.json"
CLIENT_STATE_DIR = "client_state"
_TAG = re.compile(r"^step_(\d+)$")


# Plain records DeepSpeed's ZeRO 1/2 optimizer files hold besides tensors (loss-scale settings, the
# stage enum, parameter slice offsets). Allowed by name: the weights-only unpickler rebuilds them from
# their saved fields without calling any other code; every other class or function is refused.
DEEPSPEED_RECORD_TYPES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_tensors_only(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; anything else in the file raises UnsafeCheckpointError."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_RECORD_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with generic advice; the line naming the offending global says what was found.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else repr(err))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds non-tensor Python objects, which checkpoints never "
            f"contain (loaded with torch.load(weights_only=True)); it may have been tampered with ({reason})"
        ) from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with `load_tensors_only` instead of unpickling."""

    def load(self, path: str, map_location=None):
        return load_tensors_only(path, map_location)


def use_weights_only_loading(engine: DeepSpeedEngine) -> None:
    """Make every checkpoint read of `engine` go through `load_tensors_only`.

    The class is swapped on the existing instance so that its save settings (serialization format)
    stay as DeepSpeed configured them.
    """
    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        current.__class__ = WeightsOnlyCheckpointEngine
    elif not isinstance(current, WeightsOnlyCheckpointEngine):
        raise TypeError(f"unsupported DeepSpeed checkpoint engine {type(current).__name__}")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _client_state_path(root: Path, tag: str, rank: int) -> Path:
    return root / tag / CLIENT_STATE_DIR / f"rank_{rank:05d}.json"


def _ep_size(engine: DeepSpeedEngine) -> int:
    return next((m.ep_size for m in engine.module.modules() if isinstance(m, ExpertParallelExperts)), 1)


def is_complete_checkpoint(directory: str | os.PathLike) -> bool:
    """Every rank saved its files into `directory` and rank 0 then wrote the marker."""
    return (Path(directory) / COMPLETE_FILE).is_file()


def read_client_state(run_dir: str | os.PathLike, tag: str, rank: int = 0) -> dict:
    """The loop state (`client_state`) rank `rank` saved with checkpoint `tag` of the run dir."""
    return json.loads(_client_state_path(checkpoint_root(run_dir), tag, rank).read_text())


def read_client_states(run_dir: str | os.PathLike, tag: str) -> list[dict]:
    """Every rank's client state of complete checkpoint `tag`, in rank order."""
    marker = json.loads((checkpoint_root(run_dir) / tag / COMPLETE_FILE).read_text())
    return [read_client_state(run_dir, tag, rank) for rank in range(marker["world_size"])]


def _complete_tags(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    found = []
    for path in root.glob("step_*"):
        match = _TAG.match(path.name)
        if match and (path / COMPLETE_FILE).is_file():
            found.append((int(match[1]), path.name))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """Tag of the newest complete checkpoint in the run dir, or None.

    Reads the `latest` pointer; if it is missing or names an incomplete directory, falls back
    to the complete directory with the highest step. Incomplete directories are ignored.
    """
    root = checkpoint_root(run_dir)
    pointer = root / POINTER_FILE
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if _TAG.match(tag) and (root / tag / COMPLETE_FILE).is_file():
            return tag
    complete = _complete_tags(root)
    return complete[-1][1] if complete else None


def save_checkpoint(
    engine: DeepSpeedEngine, run_dir: str | os.PathLike, step: int, client_state: dict, keep_last: int
) -> str:
    """Save the engine and this rank's `client_state` (JSON-able) as tag `step_<step>`; returns the tag.

    Collective: every rank calls it with its own client state. Saving a step that is already
    the latest complete checkpoint does nothing. Keeps the newest `keep_last` complete ones.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step)
    if find_latest_checkpoint(run_dir) == tag:
        return tag
    client_text = json.dumps(client_state)  # fails here, before any file is written, if not JSON-able
    if collectives.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)  # leftovers of an interrupted save of this step
    collectives.barrier()

    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    client_path = _client_state_path(root, tag, collectives.rank())
    client_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(client_path, client_text)
    maybe_kill_in_checkpoint(collectives.rank(), step)  # fault injection (moevit.faults); inert unless set
    collectives.barrier()

    if collectives.is_main_process():
        marker = {
            "step": step,
            "world_size": collectives.world_size(),
            "ep_size": _ep_size(engine),
            "zero_stage": engine.zero_optimization_stage(),
        }
        write_text_atomically(root / tag / COMPLETE_FILE, json.dumps(marker))
        write_text_atomically(root / POINTER_FILE, tag)
        _remove_old_checkpoints(root, step, keep_last)
    collectives.barrier()
    return tag


def _remove_old_checkpoints(root: Path, newest_step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to `newest_step` (the one just saved);
    later ones (a run resumed from an older checkpoint leaves them) are not touched."""
    complete = [tag for step, tag in _complete_tags(root) if step <= newest_step]
    for tag in complete[:-keep_last]:
        # Marker first: a crash halfway through the removal leaves an incomplete directory, never one
        # that claims to be complete with files missing.
        (root / tag / COMPLETE_FILE).unlink()
        shutil.rmtree(root / tag)
    for path in root.glob("step_*"):  # interrupted saves older than the one just saved
        match = _TAG.match(path.name)
        if match and int(match[1]) < newest_step and not (path / COMPLETE_FILE).is_file():
            shutil.rmtree(path)


def load_checkpoint(engine: DeepSpeedEngine, run_dir: str | os.PathLike, tag: str) -> dict:
    """Restore the engine (weights, optimizer, LR schedule, step counters) from a complete
    checkpoint and return this rank's client state. Collective: every rank calls it."""
    root = checkpoint_root(run_dir)
    marker_path = root / tag / COMPLETE_FILE
    if not marker_path.is_file():
        raise FileNotFoundError(f"{root / tag} is not a complete checkpoint (no {COMPLETE_FILE})")
    marker = json.loads(marker_path.read_text())
    layout = {"world_size": collectives.world_size(), "ep_size": _ep_size(engine)}
    saved = {key: marker[key] for key in layout}
    if saved != layout:
        raise ValueError(
            f"{root / tag} was saved with {saved}, this run has {layout}; optimizer state is per rank: "
            f"convert it first with `moevit ckpt reshard {root / tag} --ep-size "
            f"{layout['ep_size']} --world-size {layout['world_size']} --out NEW_RUN_DIR`"
        )
    use_weights_only_loading(engine)
    refusal = None
    try:
        load_path, _ = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except UnsafeCheckpointError as err:
        refusal, load_path = str(err), None
    # A file only one rank reads (its experts, its optimizer state) is refused on that rank alone; the
    # others would go on into the first all-to-all and die there with a traceback when it exits. So the
    # ranks agree (DeepSpeed's load has no collective of its own) and every rank raises the same refusal.
    refusals = [r for r in collectives.all_gather_objects(refusal) if r is not None]
    if refusals:
        raise UnsafeCheckpointError(refusals[0])
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {root / tag}")
    client_path = _client_state_path(root, tag, collectives.rank())
    return json.loads(client_path.read_text())


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The single-device model's state_dict from a checkpoint directory (any ep_size), on CPU.

    Dense weights come from rank 0's model file; each expert from its per-expert file, stacked
    back into (E, ...) tensors. Loads tensors only (`weights_only=True`).
    """
    directory = Path(checkpoint_dir)
    state = load_tensors_only(directory / "mp_rank_00_model_states.pt")["module"]
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for path in directory.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        for key, tensor in load_tensors_only(path).items():
            prefix, expert, param = split_expert_key(key)
            experts.setdefault(f"{prefix}.{param}", {})[expert] = tensor
    for key, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(
                f"{directory}: experts of {key} are {sorted(by_expert)}, not 0..{len(by_expert) - 1}"
            )
        state[key] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    return state


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and every CUDA device if present) RNG states, as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in state["cuda"]])
