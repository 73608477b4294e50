"""Resharding across expert-parallel sizes (issue 10), the converter on the engine: train at EP=2 on 2 ranks,
reshard the checkpoint offline (moevit.parallel.reshard, behind `moevit ckpt reshard`) to EP=1, continue
on 1 rank, reshard back to EP=2, continue on 2 ranks. Weights and every expert's AdamW state must follow
the experts exactly, and the continued training of this file's objective must match the run that never
resharded (EP=2 throughout) within 1e-6.

The objective is the engine tests' (engine_fixtures), on fixed global batches split in two shards; the
single rank runs both shards (two forwards, one backward), so both layouts optimise the same objective
and differ only in float summation order. What `moevit train` itself does after a reshard (its loader,
its step, at the new world size) is tests/fault/test_reshard_cli.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss

pytestmark = pytest.mark.distributed

SAVE_AT, LEG = 3, 3  # train 3 steps, then two legs of 3 steps each
TOLERANCE = 1e-6
DATA_SHARDS = 2  # the global batch of every step is split in 2 shards, as the EP=2 run's 2 ranks see it


def _train(engine, steps, rank, world_size) -> None:
    """The objective of the 2-rank run whatever the world size: each rank sums the losses of the data
    shards of the ranks it stands for (the load-balance loss is per shard, so 1 rank on the whole batch
    would optimise another objective); the engine then averages over the real ranks."""
    shards = DATA_SHARDS // world_size
    for step in steps:
        shard_losses = [
            step_loss(engine, step, shard, DATA_SHARDS) for shard in range(rank * shards, (rank + 1) * shards)
        ]
        engine.backward(sum(shard_losses) / shards)
        engine.step()


def expert_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """exp_avg and exp_avg_sq of every expert parameter on this rank, keyed by global expert."""
    from moevit.parallel.expert_parallel import ExpertParallelExperts

    state = {}
    for name, module in engine.module.named_modules():
        if not isinstance(module, ExpertParallelExperts):
            continue
        for local, expert in enumerate(module.local_experts):
            global_expert = module.ep_rank * module.num_local_experts + local
            for param_name, param in expert.named_parameters():
                for key in ("exp_avg", "exp_avg_sq"):
                    state[f"{name}.{global_expert}.{param_name}.{key}"] = engine.optimizer.state[param][
                        key
                    ].clone()
    return state


def leg_worker(
    run_dir: str,
    ep_size: int,
    resume: str | None,
    steps: list[int],
    save_at: int | None,
    layer_decay: float = 1.0,
) -> dict:
    """One rank: build an engine at `ep_size` (= world size), optionally resume, train `steps`, save."""
    import torch.distributed as dist

    from moevit.parallel import checkpoint as ckpt
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import initialize_distributed

    cfg = make_config(ep_size, 0, steps=SAVE_AT + 2 * LEG, layer_decay=layer_decay)
    env = initialize_distributed(cfg, timeout=GROUP_TIMEOUT)
    engine = build_engine(make_model(seed=0), cfg, env)
    out = {}
    if resume is not None:
        client = ckpt.load_checkpoint(engine, resume, ckpt.find_latest_checkpoint(resume))
        out["client_step"] = client["step"]
        out["global_steps"] = engine.global_steps
        out["loaded_optimizer"] = expert_optimizer_state(engine)
        out["loaded"] = gather_single_device_state_dict(engine.module)
        out["loaded_groups"] = [
            (group.get("layer_id"), group["lr_scale"], group["lr"], bool(group.get("moe")))
            for group in engine.optimizer.param_groups
        ]
    out["after"] = {}  # weights after each step (1-based), experts gathered
    for step in steps:
        _train(engine, [step], env.rank, env.world_size)
        out["after"][step + 1] = gather_single_device_state_dict(engine.module)
        if save_at is not None and step + 1 == save_at:
            ckpt.save_checkpoint(engine, run_dir, save_at, {"step": save_at}, keep_last=3)
            out["saved_optimizer"] = expert_optimizer_state(engine)
    dist.destroy_process_group()
    return out


def run_leg(
    run_workers,
    run_dir: Path,
    ep_size: int,
    resume: Path | None,
    steps: list[int],
    save_at: int | None,
    **extra,
) -> list[dict]:
    """`leg_worker` on `ep_size` processes (one per expert shard), each rank's result."""
    resume = None if resume is None else str(resume)
    return run_workers(
        leg_worker,
        ep_size,
        200,
        run_dir=str(run_dir),
        ep_size=ep_size,
        resume=resume,
        steps=steps,
        save_at=save_at,
        **extra,
    )


def reshard(checkpoint: Path, ep_size: int, out: Path) -> None:
    """The converter behind `moevit ckpt reshard` (its CLI runs in tests/fault/test_reshard_cli.py)."""
    from moevit.artifacts.checkpoints import resolve_checkpoint
    from moevit.parallel.reshard import reshard_checkpoint
    from moevit.train.state import reshard_client_states

    reshard_checkpoint(resolve_checkpoint(checkpoint).directory, ep_size, out, reshard_client_states)


def merged(per_rank: list[dict], key: str) -> dict[str, torch.Tensor]:
    return {name: value for out in per_rank for name, value in out[key].items()}


def assert_close(got: dict, expected: dict, what: str, tolerance: float = TOLERANCE) -> None:
    assert got.keys() == expected.keys(), what
    worst = 0.0
    for key, value in expected.items():
        if key.endswith(".usage"):  # per-rank token counts, not trained state
            continue
        difference = (got[key] - value).abs().max().item()
        assert difference <= tolerance, f"{what}: {key} differs by {difference:.3g}"
        worst = max(worst, difference)
    print(f"{what}: largest difference {worst:.3g}")  # shown with pytest -s


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ep2_to_ep1_and_back_matches_training_without_resharding(run_workers, tmp_path):
    legs = list(range(SAVE_AT, SAVE_AT + LEG)), list(range(SAVE_AT + LEG, SAVE_AT + 2 * LEG))
    all_steps = list(range(SAVE_AT + 2 * LEG))
    # The run that never reshards: EP=2 on 2 ranks throughout, saving after step SAVE_AT.
    straight = run_leg(run_workers, tmp_path / "ep2", 2, None, all_steps, SAVE_AT)
    reshard(tmp_path / "ep2", 1, tmp_path / "ep1")
    marker = json.loads(
        (tmp_path / "ep1" / "checkpoints" / f"step_{SAVE_AT:08d}" / "complete.json").read_text()
    )
    assert (marker["world_size"], marker["ep_size"]) == (1, 1)

    # EP=1 on 1 rank, continuing from the resharded checkpoint; saves at the end of its leg.
    (single,) = run_leg(run_workers, tmp_path / "ep1", 1, tmp_path / "ep1", legs[0], SAVE_AT + LEG)
    assert single["client_step"] == SAVE_AT and single["global_steps"] == SAVE_AT
    assert_close(single["loaded"], straight[0]["after"][SAVE_AT], "weights loaded at EP=1", tolerance=0.0)
    # Every expert's Adam moments followed it from rank 0 or 1 of the EP=2 run onto the single rank.
    assert_close(single["loaded_optimizer"], merged(straight, "saved_optimizer"), "Adam state at EP=1", 0.0)
    for step in (SAVE_AT + 1, SAVE_AT + LEG):  # 1 rank on whole batches = 2 ranks on halves
        assert_close(single["after"][step], straight[0]["after"][step], f"EP=1 leg, after step {step}")

    reshard(tmp_path / "ep1", 2, tmp_path / "ep2_again")
    back = run_leg(run_workers, tmp_path / "ep2_again", 2, tmp_path / "ep2_again", legs[1], None)
    for rank, out in enumerate(back):
        assert out["client_step"] == SAVE_AT + LEG
        assert_close(out["loaded"], single["after"][SAVE_AT + LEG], f"rank {rank}: loaded back at EP=2", 0.0)
    assert_close(merged(back, "loaded_optimizer"), single["saved_optimizer"], "Adam state back at EP=2", 0.0)
    # The continued training matches the run that never resharded.
    last = SAVE_AT + 2 * LEG
    for rank, out in enumerate(back):
        assert_close(out["after"][last], straight[rank]["after"][last], f"rank {rank}: after EP=2 -> 1 -> 2")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_layer_decay_checkpoint_reshards_ep2_to_ep1(run_workers, tmp_path):
    """With layer decay every MoE layer's experts have optimizer groups of their own (one lr scale per
    block): resharding must still hand each expert its Adam state, and the resumed run its groups."""
    decay = 0.5
    straight = run_leg(
        run_workers, tmp_path / "ep2", 2, None, list(range(SAVE_AT + 1)), SAVE_AT, layer_decay=decay
    )
    reshard(tmp_path / "ep2", 1, tmp_path / "ep1")
    (single,) = run_leg(
        run_workers, tmp_path / "ep1", 1, tmp_path / "ep1", [SAVE_AT], None, layer_decay=decay
    )
    assert_close(single["loaded"], straight[0]["after"][SAVE_AT], "weights loaded at EP=1", tolerance=0.0)
    assert_close(single["loaded_optimizer"], merged(straight, "saved_optimizer"), "Adam state at EP=1", 0.0)
    moe_groups = [(layer, scale) for layer, scale, _, moe in single["loaded_groups"] if moe]
    # moevit_debug: 4 blocks, experts in blocks 1 and 3 (layers 2 and 4), weights then biases.
    assert moe_groups == [(4, decay), (4, decay), (2, decay**3), (2, decay**3)]
    assert all(
        lr == pytest.approx(scale * single["loaded_groups"][0][2])
        for _, scale, lr, _ in single["loaded_groups"]
    )
    assert_close(
        single["after"][SAVE_AT + 1], straight[0]["after"][SAVE_AT + 1], "EP=1 step after resharding"
    )
