"""NaN and inf losses (issue 10): injected into one rank's loss (moevit.faults), every rank skips that
optimizer step together, the replicas stay identical, the skips are counted, and `max_bad_steps`
consecutive skips stop training with a clear message and exit 3.

Two levels: the real DeepSpeed engine (EP=2, 2 gloo ranks) driven step by step, where weights can be
compared before and after each step on each rank; and `moevit train --nproc 2`, where the count must
reach metrics.jsonl and the stop must reach the user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_one_line_error, read_records, run_moevit, write_config

from moevit.faults import NONFINITE_LOSS

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))  # engine_fixtures, also in workers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# rank 1 NaN at step 2, rank 0 inf at step 3, then rank 1 NaN from step 5 on: 3 in a row stop at step 7.
INJECTED = "1:2,0:3:inf,1:5-9"
MAX_BAD_STEPS = 3


def engine_worker() -> dict:
    """One rank: the real engine at EP=2, MultiTaskStep with injected NaN/inf losses."""
    from engine_fixtures import (
        GROUP_TIMEOUT,
        TASK_CLASSES,
        make_config,
        make_model,
        rank_batch,
        tasks_of_step,
    )

    from moevit.config.schema import AuxLossConfig
    from moevit.data.multitask import StepPlan, TaskBatch
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import initialize_distributed
    from moevit.train.step import MultiTaskStep, NonFiniteLossError

    os.environ[NONFINITE_LOSS] = INJECTED
    cfg = make_config(ep_size=2, zero_stage=0, steps=10)
    env = initialize_distributed(cfg, timeout=GROUP_TIMEOUT)
    engine = build_engine(make_model(seed=0), cfg, env)
    prior = {task: 1 / len(TASK_CLASSES) for task in TASK_CLASSES}
    train_step = MultiTaskStep(
        engine, list(TASK_CLASSES), AuxLossConfig(), prior, env.world_size, torch.device("cpu"), MAX_BAD_STEPS
    )
    steps, stopped = [], None
    for step in range(1, 11):
        before = gather_single_device_state_dict(engine.module)
        plan = StepPlan(
            step,
            tuple(TaskBatch(t, rank_batch(step, t, env.rank, env.world_size)) for t in tasks_of_step(step)),
        )
        try:
            result = train_step(plan, {task: 1.0 for task in TASK_CLASSES}, step)
        except NonFiniteLossError as err:
            stopped = (step, str(err))
            break
        after = gather_single_device_state_dict(engine.module)
        changed = any(not torch.equal(before[k], after[k]) for k in before if not k.endswith(".usage"))
        steps.append({"skipped": result.skipped, "count": result.skipped_steps, "changed": changed})
    final = gather_single_device_state_dict(engine.module)
    return {"steps": steps, "stopped": stopped, "weights": final, "optimizer_steps": engine.global_steps}


@pytest.mark.timeout(200)
def test_all_ranks_skip_together_and_stop_after_max_bad_steps(run_workers):
    ranks = run_workers(engine_worker, world_size=2, timeout_s=180)
    expected_skips = [False, True, True, False, True, True]  # steps 1..6; step 7 is the third in a row
    for out in ranks:
        assert [s["skipped"] for s in out["steps"]] == expected_skips
        assert [s["changed"] for s in out["steps"]] == [not skipped for skipped in expected_skips]
        assert [s["count"] for s in out["steps"]] == [0, 1, 2, 2, 3, 4]
        assert out["optimizer_steps"] == 2  # steps 1 and 4 only
        step, message = out["stopped"]
        assert step == 7 and "3 consecutive steps" in message and "train.max_bad_steps=3" in message
    # Replicas never diverge: every weight (experts gathered, dense replicated) is the same on both ranks.
    first, second = (out["weights"] for out in ranks)
    for key, value in first.items():
        if not key.endswith(".usage"):  # per-rank token counts, not weights
            assert torch.equal(value, second[key]), key
        assert torch.isfinite(value).all(), key


@pytest.mark.timeout(200)
def test_cli_counts_skipped_steps_and_stops_with_a_clear_message(synth_root, tmp_path, two_task_config):
    run_dir = tmp_path / "run"
    config = two_task_config(synth_root, run_dir, steps=8, max_bad_steps=2, checkpoint_every=0)
    path = write_config(tmp_path / "train.yaml", config)
    # rank 1 NaN at step 2 (skipped, training goes on), rank 0 inf at steps 4 and 5 (two in a row: stop).
    done = run_moevit("train", str(path), "--nproc", "2", env={NONFINITE_LOSS: "1:2,0:4-5:inf"})
    assert done.returncode == 3, done.stderr[-4000:]  # docs/fault-tolerance.md's exit code for this stop
    message = assert_one_line_error(done.stderr)  # every rank prints the same line, no traceback
    assert "loss was NaN or inf on some rank in 2 consecutive steps (the last at step 5)" in message
    totals = {r["step"]: r for r in read_records(run_dir) if r["split"] == "train" and r["task"] is None}
    assert sorted(totals) == [1, 2, 3, 4]
    assert [totals[s]["nonfinite_steps_skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert "total_loss" not in totals[2] and "total_loss" in totals[3]  # a skipped step adds no loss
