"""kill -9 and auto-resume with DataLoader workers (issue 20), as a user runs it: a 2-process EP=2
`moevit train` on all three task types (so the classification, detection and segmentation transforms all
draw), one DataLoader worker per task and process, a checkpoint every 3 steps, SIGKILLed after step 7 is
logged, then `moevit train --resume auto`: every logged loss and the final evaluation and weights equal
an uninterrupted run's. The same holds when the resumed run uses 2 workers instead of 1, with every task
reading WebDataset shards (data.storage: shards) instead of folders, and for one process (EP=1, `moevit
train` without `--nproc`, the classification task), which runs in the command's own process at torch's
default thread count: torchrun sets one thread per process for `--nproc 2`, the suite one for itself.

Augmentation is seeded per sample by its place in the task's sample stream (moevit.data.seeding), so
the restarted workers draw what the uninterrupted run's drew.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fault_helpers import comparable, final_weights, kill_when_logged, read_records, run_moevit, write_config

from moevit.data.shards import write_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 12
KILL_AFTER = 7  # between the checkpoints of steps 6 and 9
DATASETS = ("imagenet", "coco", "ade20k")


def config(tiny_config, synth_root, run_dir, num_workers: int, nproc: int = 2, shard_root=None) -> dict:
    """All three task types on 2 processes; one process trains the classification task alone (the two
    intra-op threads it runs with make a step slower than a rank's, on the same two cores). With
    `shard_root`, every task reads its train and val splits from shards."""
    datasets = DATASETS if nproc > 1 else ("imagenet",)
    tasks = {}
    if shard_root is not None:
        tasks = {name: {"data": {"root": str(shard_root / name), "storage": "shards"}} for name in datasets}
    return tiny_config(
        synth_root,
        run_dir,
        datasets=datasets,
        tasks=tasks,
        train={
            "steps": STEPS,
            "checkpoint_every": 3,
            "eval_batches": 2,
            "num_workers": num_workers,  # what the demo and real runs use; not 0
            "optim": {"warmup_steps": 4},
        },
        parallel={"ep_size": nproc},
    )


def straight_run(run_dir, run_config: dict, nproc: int = 2):
    """The uninterrupted run's records and final weights."""
    path = write_config(run_dir.parent / "train.yaml", run_config)
    done = run_moevit("train", str(path), "--nproc", str(nproc))
    assert done.returncode == 0, done.stderr[-4000:]
    return comparable(read_records(run_dir)), final_weights(run_dir, STEPS)


def assert_same_run(run_dir, reference) -> None:
    records, weights = reference
    assert comparable(read_records(run_dir)) == records  # every loss, weight, lr and the final eval
    resumed = final_weights(run_dir, STEPS)
    assert resumed.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(resumed[key], value), key


def assert_kill_and_resume_match(tmp_path, first_config: dict, resume_config: dict, reference) -> None:
    """SIGKILL a 2-process run with `first_config` after step KILL_AFTER, resume it with `resume_config`:
    every record and the final weights equal `reference`'s."""
    run_dir = Path(first_config["output_dir"])
    first = write_config(tmp_path / "train.yaml", first_config)
    kill_when_logged(["train", str(first), "--nproc", "2"], run_dir, KILL_AFTER)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    second = write_config(tmp_path / "resume.yaml", resume_config)
    done = run_moevit("train", str(second), "--nproc", "2", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(run_dir, reference)


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory, tiny_config):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    return straight_run(run_dir, config(tiny_config, synth_root, run_dir, 1))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers_after_resume", [1, 2])
def test_kill9_between_checkpoints_with_workers_resumes_bit_identical(
    synth_root, tmp_path, reference, tiny_config, workers_after_resume
):
    run_dir = tmp_path / "run"
    assert_kill_and_resume_match(
        tmp_path,
        config(tiny_config, synth_root, run_dir, 1),
        config(tiny_config, synth_root, run_dir, workers_after_resume),
        reference,
    )


@pytest.fixture(scope="module")
def shard_root(synth_root, tmp_path_factory):
    """The tiny datasets' train and val splits as shards of 16 samples: shards/{dataset}/{split}."""
    root = tmp_path_factory.mktemp("shards")
    for dataset in DATASETS:
        for split in ("train", "val"):
            write_shards(dataset, synth_root / dataset, split, root / dataset / split, shard_size=16)
    return root


@pytest.mark.timeout(900)
def test_kill9_with_workers_resumes_bit_identical_from_shards(synth_root, shard_root, tmp_path, tiny_config):
    """Every task on shards: killed with 1 worker per task and resumed with 2, as an uninterrupted run."""
    reference_dir = tmp_path / "straight" / "run"
    reference_dir.parent.mkdir()
    shard_reference = straight_run(
        reference_dir, config(tiny_config, synth_root, reference_dir, 1, shard_root=shard_root)
    )
    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    assert_kill_and_resume_match(
        run_dir.parent,
        config(tiny_config, synth_root, run_dir, 1, shard_root=shard_root),
        config(tiny_config, synth_root, run_dir, 2, shard_root=shard_root),
        shard_reference,
    )


@pytest.mark.timeout(600)
def test_one_process_at_the_default_thread_count_resumes_bit_identical(
    synth_root, tmp_path, tmp_path_factory, tiny_config, monkeypatch
):
    # The runs inherit this environment: no OMP_NUM_THREADS, so torch picks its default thread count.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    reference_dir = tmp_path_factory.mktemp("straight-one-process") / "run"
    reference = straight_run(
        reference_dir, config(tiny_config, synth_root, reference_dir, 1, nproc=1), nproc=1
    )
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "train.yaml", config(tiny_config, synth_root, run_dir, 1, nproc=1))
    kill_when_logged(["train", str(path)], run_dir, KILL_AFTER)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    done = run_moevit("train", str(path), "--resume", "auto")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(run_dir, reference)
