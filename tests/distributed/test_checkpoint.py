"""Checkpoints of the real engine on 2 gloo processes, ep_size 2, ZeRO 0 and 2.

Per stage, one run: train 4 steps saving at 2, 3 and 4 (keep_last=2), continue to step 6 as
the reference; leave an interrupted save at step 7 (files but no completion marker, pointer
untouched); then a fresh engine from another initialisation resumes from the newest complete
checkpoint and trains steps 4-5 again: losses and weights must be bit-identical to the
continuation, and each rank gets its own client state back. The expert files must also load
into an ep_size 1 engine (weights only), and consolidate into the single-device model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss

pytestmark = pytest.mark.distributed

STAGES = (0, 2)
TOTAL_STEPS = 8


def _train(engine, steps, rank: int, world_size: int) -> list[float]:
    losses = []
    for step in steps:
        loss = step_loss(engine, step, rank, world_size)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _run_stage(stage: int, run_dir: Path, env) -> dict:
    from moevit.parallel import checkpoint as ckpt
    from moevit.parallel.collectives import barrier
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict

    cfg = make_config(2, stage, TOTAL_STEPS)
    engine = build_engine(make_model(seed=0), cfg, env)
    out = {}
    for step in range(4):
        _train(engine, [step], env.rank, env.world_size)
        if step + 1 >= 2:
            client = {"step": step + 1, "rank": env.rank, "rng": ckpt.capture_rng_state()}
            ckpt.save_checkpoint(engine, run_dir, step + 1, client, keep_last=2)
    out["resave_tag"] = ckpt.save_checkpoint(engine, run_dir, 4, {"ignored": True}, keep_last=2)
    out["saved"] = gather_single_device_state_dict(engine.module)
    out["continued_losses"] = _train(engine, range(4, 6), env.rank, env.world_size)
    out["continued"] = gather_single_device_state_dict(engine.module)

    root = ckpt.checkpoint_root(run_dir)
    if env.rank == 0:  # an interrupted save: some files, no completion marker, pointer unchanged
        (root / "step_00000007").mkdir()
        (root / "step_00000007" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    barrier()
    out["latest"] = ckpt.find_latest_checkpoint(run_dir)
    out["listing"] = sorted(p.name for p in root.iterdir() if p.is_dir())

    resumed = build_engine(make_model(seed=1), cfg, env)
    out["client"] = ckpt.load_checkpoint(resumed, run_dir, out["latest"])
    out["global_steps"] = resumed.global_steps
    out["restored"] = gather_single_device_state_dict(resumed.module)
    out["resumed_losses"] = _train(resumed, range(4, 6), env.rank, env.world_size)
    out["resumed"] = gather_single_device_state_dict(resumed.module)

    single = build_engine(make_model(seed=2), make_config(1, stage, TOTAL_STEPS), env)
    single.load_checkpoint(str(root), tag=out["latest"], load_module_only=True, load_optimizer_states=False)
    out["loaded_at_ep1"] = gather_single_device_state_dict(single.module)
    if env.rank == 0:
        out["consolidated"] = ckpt.consolidated_state_dict(root / out["latest"])
    return out


def checkpoint_worker(run_dir: str) -> dict:
    import torch.distributed as dist

    from moevit.parallel.setup import ensure_expert_groups, initialize_distributed

    env = initialize_distributed(make_config(2, 0, TOTAL_STEPS), timeout=GROUP_TIMEOUT)
    ensure_expert_groups(1)
    results = {stage: _run_stage(stage, Path(run_dir) / f"zero{stage}", env) for stage in STAGES}
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def results(run_workers, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_workers(checkpoint_worker, world_size=2, timeout_s=240, run_dir=str(run_dir))


def _assert_equal_weights(a: dict, b: dict, what: str, tolerance: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".usage"):  # each rank's own token counts; rank 0's are saved
            continue
        difference = (a[key].float() - b[key].float()).abs().max().item()
        assert difference <= tolerance, f"{what}: {key} differs by {difference:.3g}"


@pytest.mark.parametrize("stage", STAGES)
def test_pointer_keep_last_and_interrupted_save(results, stage):
    out = results[0][stage]
    assert out["latest"] == "step_00000004"
    assert out["resave_tag"] == "step_00000004"
    assert out["listing"] == ["step_00000003", "step_00000004", "step_00000007"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_is_bit_identical_and_restores_client_state(results, stage):
    for rank, per_rank in enumerate(results):
        out = per_rank[stage]
        assert out["client"]["step"] == 4 and out["client"]["rank"] == rank
        assert out["global_steps"] == 4
        _assert_equal_weights(out["restored"], out["saved"], f"rank {rank} restored weights")
        assert out["resumed_losses"] == out["continued_losses"]
        _assert_equal_weights(out["resumed"], out["continued"], f"rank {rank} weights after resuming")


@pytest.mark.parametrize("stage", STAGES)
def test_expert_files_load_at_another_ep_size_and_consolidate(results, stage):
    out = results[0][stage]
    _assert_equal_weights(
        out["loaded_at_ep1"], out["saved"], "ep_size 1 engine loading an ep_size 2 checkpoint"
    )
    consolidated = out["consolidated"]
    assert torch.equal(
        consolidated["backbone.blocks.1.mlp.experts.fc1_weight"],
        out["saved"]["backbone.blocks.1.mlp.experts.fc1_weight"],
    )
    _assert_equal_weights(consolidated, out["saved"], "consolidated checkpoint")
