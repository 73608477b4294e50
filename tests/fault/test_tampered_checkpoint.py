"""A tampered checkpoint (issue 10, issue 22): a `.pt` file carrying a pickle payload (an object whose
`__reduce__` runs a shell command) is refused, naming the file, and the payload never runs, both when
DeepSpeed's loader reads the checkpoint (`moevit train --resume` at EP=2 on 2 processes) and when moevit
reads it (`consolidated_state_dict`, used by `moevit eval` and the resharder). Client state is JSON and
never unpickled.

One EP=2 run is trained once per module; each case tampers one file of a copy of its checkpoint: the
dense model file, an expert file and an optimizer file, the last two of rank 1 only, so rank 0 loads
cleanly and must be stopped with it. The user sees one `moevit: error:` line naming the file and exit 2
(docs/fault-tolerance.md), never a traceback.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from fault_helpers import assert_one_line_error, run_moevit, write_config

from moevit.parallel.checkpoint import (
    UnsafeCheckpointError,
    WeightsOnlyCheckpointEngine,
    consolidated_state_dict,
    load_tensors_only,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEP_DIR = "checkpoints/step_00000001"


class Payload:
    """Unpickling this runs `touch MARKER` (os.system), as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tamper(path, marker) -> None:
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory, two_task_config):
    """A 1-step EP=2 run on 2 processes: (its run dir, its config); copied before any tampering."""
    base = tmp_path_factory.mktemp("tamper")
    run_dir = base / "run"
    config = two_task_config(synth_root, run_dir, steps=1)
    done = run_moevit("train", str(write_config(base / "train.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, config


def expert_file_of_rank_1(checkpoint):
    """An expert's weights held by EP rank 1 (experts 2 and 3 of the 4): `layer_L_expert_E_...`."""
    files = sorted(checkpoint.glob("layer_*_expert_3_mp_rank_00_model_states.pt"))
    assert files, sorted(p.name for p in checkpoint.iterdir())
    return files[0].name


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["dense model", "expert", "optimizer"])
def test_a_pickle_payload_in_a_checkpoint_is_refused(trained, tmp_path, target):
    source_run, config = trained
    run_dir = tmp_path / "run"
    shutil.copytree(source_run, run_dir)
    config = {**config, "output_dir": str(run_dir)}
    path = write_config(tmp_path / "train.yaml", config)
    checkpoint = run_dir / STEP_DIR
    name = {
        "dense model": "mp_rank_00_model_states.pt",
        "expert": expert_file_of_rank_1(checkpoint),
        "optimizer": "expp_rank_1_mp_rank_00_optim_states.pt",
    }[target]
    tampered = checkpoint / name
    marker = tmp_path / "payload_ran"
    tamper(tampered, marker)

    with pytest.raises(UnsafeCheckpointError, match=f"{name}: refused to load"):
        load_tensors_only(tampered)
    # DeepSpeed reads every file through the engine's checkpoint engine, which resume swaps for this one.
    with pytest.raises(UnsafeCheckpointError, match=f"{name}: refused"):
        WeightsOnlyCheckpointEngine().load(str(tampered), map_location="cpu")
    if target != "optimizer":  # moevit's own reader of the weights (eval, reshard)
        with pytest.raises(UnsafeCheckpointError, match="GLOBAL posix.system"):
            consolidated_state_dict(checkpoint)

    resumed = run_moevit("train", str(path), "train.steps=2", "--nproc", "2", "--resume", "auto")
    assert resumed.returncode == 2, resumed.stderr[-4000:]
    message = assert_one_line_error(resumed.stderr, target)
    assert message.startswith(f"moevit: error: {tampered}: refused to load"), message
    assert not marker.exists()  # the payload never ran
    assert not (run_dir / "checkpoints" / "step_00000002").exists()
