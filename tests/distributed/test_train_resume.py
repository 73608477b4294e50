"""Exact resume (issue 4, item 6; issue 22): a 2N-step run stopped after N steps and resumed gives
bit-identical records to the same run uninterrupted, on 2 CPU processes with expert parallelism (EP=2),
the mutual-information loss, uncertainty weighting and router jitter.

What the README promises, and so what is tested: the interrupted run and the resumed one have the same
config, `train.steps = 2N` included, since `train.steps` sets the cosine LR schedule. The first leg is
stopped after step N by SIGTERM (what `scancel` and torchrun send: checkpoint and exit), on every rank.
The warmup ends before step N, so both legs train in the cosine part of the schedule, where a first leg
run with `train.steps = N` would have taken other lrs (asserted below, so the test cannot silently go
back inside the warmup); that longer-schedule continuation is not the same run, and the loop says so
(moevit.train.schedule_change, tests/unit/test_schedule_change.py).

Evaluations and checkpoints happen at the same steps in both runs (an evaluation's DataLoader draws from
the global torch RNG, which the checkpoint then carries).
"""

from __future__ import annotations

import json
import os
import signal

import pytest

import moevit.train.loop
from moevit.config import build_config
from moevit.config.schema import Config
from moevit.parallel.engine import warmup_cosine_factor
from moevit.train.loop import run_training
from moevit.train.throughput import WALL_CLOCK_FIELDS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HALF = 3
WARMUP = 1  # ends before step HALF: the steps of both legs after it follow the cosine


def train_worker(config: dict, resume: str | None, stop_after: int | None = None) -> dict:
    """One rank of a training launch (run by run_workers in a fresh process); with `stop_after`, the
    rank sends itself SIGTERM once that step has trained, as a launcher stopping the job would."""
    if stop_after is not None:
        train_one_step = moevit.train.loop.train_one_step

        def then_terminate(state, engine, logger, step, device):
            train_one_step(state, engine, logger, step, device)
            if step == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: checkpoint at this step, exit

        moevit.train.loop.train_one_step = then_terminate
    return run_training(build_config(Config, config), resume)


def make_config(
    tiny_config, data_root, output_dir, steps: int, sampling: str, num_workers: int, grad_accum_steps: int = 1
) -> dict:
    """The run's config, built in the test's process by the `tiny_config` fixture (passed in)."""
    return tiny_config(
        data_root,
        output_dir,
        # Two classification tasks (own routers and heads) on one dataset keep the steps and checkpoints
        # small; the CLI test in tests/e2e covers the other task types.
        datasets={"shapes": "imagenet", "objects": "imagenet"},
        batch_sizes={"objects": 4},
        aux_loss={"mutual_information": 0.1},
        train={
            "steps": steps,
            "eval_every": HALF,
            "eval_batches": 1,
            "checkpoint_every": HALF,
            "num_workers": num_workers,
            "grad_accum_steps": grad_accum_steps,
            "optim": {"warmup_steps": WARMUP},
            "loss_balancing": {"method": "uncertainty", "lr": 0.1},
            "sampling": {"strategy": sampling},
        },
        parallel={"ep_size": 2},
        # Router input jitter draws from torch's generator in every training forward: the checkpoint's
        # RNG state must carry it for the resumed steps to match.
        model={"moe": {"router_jitter": 0.05}},
    )


def records(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The wall-clock speed fields are the only values allowed to differ.
    return [{k: v for k, v in line.items() if k not in WALL_CLOCK_FIELDS} for line in lines]


# round_robin: one task per step, so the MI loss of every step after the first takes the other task's
# rows from the running estimate, which the checkpoint must carry for the resumed step to match.
# One DataLoader worker per task is how users run (augmentation is seeded per sample, moevit.data.seeding);
# the variant without workers stays. With gradient accumulation (2 rounds a step) the loader's position,
# the MI statistics pass (which forks the RNG) and the running estimate must all resume exactly too.
@pytest.mark.parametrize(
    ("sampling", "num_workers", "grad_accum_steps"),
    [("all", 0, 1), ("all", 1, 1), ("round_robin", 1, 1), ("round_robin", 1, 2)],
)
def test_two_halves_with_resume_equal_one_straight_run(
    tmp_path, synth_root, tiny_config, run_workers, sampling, num_workers, grad_accum_steps
):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for run_dir, resume, stop_after in ((straight, None, None), (halves, None, HALF), (halves, "auto", None)):
        config = make_config(
            tiny_config, synth_root, run_dir, 2 * HALF, sampling, num_workers, grad_accum_steps
        )
        run_workers(train_worker, 2, 150, config=config, resume=resume, stop_after=stop_after)
        if stop_after is not None:  # the signal stopped the first leg at its step, with a checkpoint
            assert max(r["step"] for r in records(halves)) == HALF
            assert (halves / "checkpoints" / "latest").read_text() == f"step_{HALF:08d}"

    expected, got = records(straight), records(halves)
    mutual_information = [
        r["mutual_information"] for r in got if r["split"] == "train" and r.get("task") is None
    ]
    # The gates start small and random, so routing starts nearly task-independent (I(T; E) near 0).
    assert len(mutual_information) == 2 * HALF and all(mi < 0 for mi in mutual_information[2:])
    assert [r["step"] for r in got if r["split"] == "train"][-1] == 2 * HALF
    assert got == expected  # every loss, weight, lr and eval metric, compared as exact floats
    # The first leg trained past the warmup: with train.steps = HALF its lrs would have differed.
    lrs = [r["lr"] for r in got if r["split"] == "train" and r.get("task") is None]
    half_schedule = [warmup_cosine_factor(s, WARMUP, HALF, 0.0) for s in range(HALF)]
    full_schedule = [warmup_cosine_factor(s, WARMUP, 2 * HALF, 0.0) for s in range(HALF)]
    assert half_schedule != full_schedule
    assert all(a > b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :])), lrs
    assert (halves / "checkpoints" / "latest").read_text() == f"step_{2 * HALF:08d}"
