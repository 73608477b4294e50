"""kill -9 and auto-resume (issue 10): a 2-process EP=2 `moevit train` is SIGKILLed (every process of
the launch) at 3 seeded random steps and restarted with `--resume auto` each time; then one rank is
killed between writing its checkpoint files and the commit, and the next start resumes from the
previous complete checkpoint. The run ends bit-identical to an uninterrupted one: every logged loss,
weight and lr, and every weight of the final checkpoint.

A checkpoint is written every step (train.checkpoint_every=1), so a kill lands anywhere: in a step,
in a save, or between the two.
"""

from __future__ import annotations

import random

import pytest
import torch
from fault_helpers import (
    comparable,
    final_weights,
    kill_when_logged,
    read_records,
    run_moevit,
    write_config,
)

from moevit.faults import KILL_IN_CHECKPOINT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 10
KILL_SEED = 10


def kill_steps(seed: int, count: int = 3, gap: int = 2) -> list[int]:
    """`count` steps in [1, STEPS - 3], at least `gap` apart (a restarted run's first records must not be
    mistaken for the killed run's last ones); room is left for the mid-checkpoint kill after them."""
    rng = random.Random(seed)
    while True:
        steps = sorted(rng.sample(range(1, STEPS - 2), count))
        if all(b - a >= gap for a, b in zip(steps, steps[1:])):
            return steps


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory, two_task_config):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    config = write_config(run_dir.parent / "train.yaml", two_task_config(synth_root, run_dir, STEPS))
    done = run_moevit("train", str(config), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    return read_records(run_dir), final_weights(run_dir, STEPS)


def assert_same_run(run_dir, reference) -> None:
    records, weights = reference
    assert comparable(read_records(run_dir)) == comparable(records)
    resumed_weights = final_weights(run_dir, STEPS)
    assert resumed_weights.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(resumed_weights[key], value), key


@pytest.mark.timeout(600)
def test_kill9_three_times_and_mid_checkpoint_then_resume_is_bit_identical(
    synth_root, tmp_path, reference, two_task_config
):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", two_task_config(synth_root, run_dir, STEPS))
    args = ["train", str(config), "--nproc", "2", "--resume", "auto"]
    kills = kill_steps(KILL_SEED)
    for step in kills:
        kill_when_logged(args, run_dir, step)

    # Rank 1 dies after writing its files of a later step, before the save is committed.
    torn = kills[-1] + 2
    killed = run_moevit(*args, env={KILL_IN_CHECKPOINT: f"1:{torn}"})
    assert killed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"step_{torn:08d}").is_dir()
    assert not (checkpoints / f"step_{torn:08d}" / "complete.json").exists()
    assert (checkpoints / "latest").read_text() == f"step_{torn - 1:08d}"

    done = run_moevit(*args)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"at step {torn - 1}" in done.stdout + done.stderr  # the previous complete checkpoint
    assert_same_run(run_dir, reference)
