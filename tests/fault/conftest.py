"""Fixtures of the fault-injection suite: the multi-process launcher of tests/distributed, and the small
two-task config most of its CLI runs train (on `synth_root`, the session's tiny data of tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test files import fault_helpers
_spec = importlib.util.spec_from_file_location(
    "distributed_conftest", Path(__file__).parents[1] / "distributed" / "conftest.py"
)
_distributed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_distributed)
run_workers = _distributed.run_workers  # the fixture, re-exported


@pytest.fixture(scope="session")
def two_task_config(tiny_config):
    """two_task_config(synth_root, output_dir, steps, **train) -> dict: moevit_debug (4 experts, top-2)
    with two classification tasks on the tiny ImageNet folder, EP=2: small checkpoints (a few MB), so a
    checkpoint every step stays cheap. `train` replaces or adds keys of the train section."""

    def build(synth_root: Path, output_dir: Path, steps: int, **train) -> dict:
        return tiny_config(
            synth_root,
            output_dir,
            datasets={"shapes": "imagenet", "objects": "imagenet"},
            batch_sizes={"objects": 4},
            aux_loss={"mutual_information": 0.1},
            train={
                "steps": steps,
                "eval_every": 0,
                "eval_batches": 1,
                "checkpoint_every": 1,
                "keep_last": 2,
                "num_workers": 0,  # the no-worker variant; test_kill_resume_workers.py runs with workers
                "optim": {"warmup_steps": 4},
                **train,
            },
            parallel={"ep_size": 2},
        )

    return build
