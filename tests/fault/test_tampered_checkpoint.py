"""A tampered checkpoint (issue 10): a `.pt` file carrying a pickle payload (an object whose `__reduce__`
runs a shell command) is refused, naming the file, and the payload never runs, both when DeepSpeed's
loader reads the checkpoint (`moevit train --resume`) and when moevit reads it (`consolidated_state_dict`,
used by `moevit eval` and the resharder). Client state is JSON and never unpickled.
"""

from __future__ import annotations

import os

import pytest
import torch
from fault_helpers import run_moevit, write_config

from moevit.parallel.checkpoint import (
    UnsafeCheckpointError,
    WeightsOnlyCheckpointEngine,
    consolidated_state_dict,
    load_tensors_only,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


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


@pytest.mark.timeout(240)
def test_a_pickle_payload_in_a_checkpoint_is_refused(synth_root, tmp_path, two_task_config):
    run_dir = tmp_path / "run"
    config = two_task_config(synth_root, run_dir, steps=1)
    config["parallel"]["ep_size"] = 1
    path = write_config(tmp_path / "train.yaml", config)
    assert run_moevit("train", str(path)).returncode == 0
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    marker = tmp_path / "payload_ran"

    model_file = checkpoint / "mp_rank_00_model_states.pt"
    tamper(model_file, marker)
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt: refused to load"):
        load_tensors_only(model_file)
    with pytest.raises(UnsafeCheckpointError, match="GLOBAL posix.system"):
        consolidated_state_dict(checkpoint)

    resumed = run_moevit("train", str(path), "train.steps=2", "--resume", "auto")
    assert resumed.returncode != 0
    assert f"UnsafeCheckpointError: {model_file}: refused to load" in resumed.stderr
    assert not marker.exists()  # the payload never ran

    # DeepSpeed reads the optimizer files through the engine's checkpoint engine, which resume swaps for:
    optimizer_file = checkpoint / "expp_rank_0_mp_rank_00_optim_states.pt"
    tamper(optimizer_file, marker)
    with pytest.raises(UnsafeCheckpointError, match="expp_rank_0_mp_rank_00_optim_states.pt: refused"):
        WeightsOnlyCheckpointEngine().load(str(optimizer_file), map_location="cpu")
    assert not marker.exists()
