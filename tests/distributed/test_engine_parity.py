"""The real DeepSpeed engine on 2 gloo processes: ep_size 2 against ep_size 1 (pure data parallel)
and against a single-process torch reference, for ZeRO 0, 1 and 2.

One launch trains, for every ZeRO stage, a fresh two-task model at ep_size 1 and at ep_size 2
for 10 steps on the same global batches; odd steps train only task "a", so task "b"'s head and
routers get no gradient then (they must not stall the reduction). Clipping is active in every
step. The reference replays the same steps on the unsharded model with torch's AdamW, LR
schedule and global-norm clipping, averaging the two ranks' objectives.

The objective here is hand-written (task losses plus load balance), so that a plain torch reference
exists; the training step itself (moevit.train.step: MI, z-loss, a loss balancer, the three head
types) runs through the engine at EP=2 vs EP=1 and vs one process in test_step_engine_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss, train_engine

pytestmark = pytest.mark.distributed

STEPS = 10
STAGES = (0, 1, 2)
TOLERANCE = 1e-5


def parity_worker(stages: tuple[int, ...], ep_sizes: tuple[int, ...], steps: int) -> dict:
    import torch.distributed as dist

    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import ensure_expert_groups, initialize_distributed

    env = initialize_distributed(make_config(ep_sizes[0], 0, steps), timeout=GROUP_TIMEOUT)
    for ep_size in ep_sizes:
        ensure_expert_groups(ep_size)
    results = {}
    for stage in stages:
        for ep_size in ep_sizes:
            engine = build_engine(make_model(), make_config(ep_size, stage, steps), env)
            losses = train_engine(engine, steps, env.rank, env.world_size)
            results[(stage, ep_size)] = {
                "losses": losses,
                "final": gather_single_device_state_dict(engine.module),
                "lr": engine.get_lr()[0],
            }
    dist.destroy_process_group()
    return results


def reference_run(steps: int, world_size: int = 2) -> dict:
    """The same training on one process, without DeepSpeed."""
    from moevit.parallel.engine import warmup_cosine_factor

    cfg = make_config(1, 0, steps)
    optim = cfg.train.optim
    model = make_model()
    skip = model.no_weight_decay()
    # Expert biases are (E, H) tensors here but one (H,) vector per expert under the engine.
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in skip or n.endswith("_bias")]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=tuple(optim.betas),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, optim.warmup_steps, steps, optim.min_lr / optim.lr)
    )
    losses = []
    for step in range(steps):
        loss = sum(step_loss(model, step, rank, world_size) for rank in range(world_size)) / world_size
        loss.backward()
        for p in model.parameters():  # DeepSpeed's flat buffers hand unused parameters zero gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    return {"losses": losses, "final": model.state_dict()}


@pytest.fixture(scope="module")
def trained(run_workers):
    per_rank = run_workers(
        parity_worker, world_size=2, timeout_s=240, stages=STAGES, ep_sizes=(1, 2), steps=STEPS
    )
    return {"ranks": per_rank, "reference": reference_run(STEPS), "initial": make_model().state_dict()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest difference over the weights; routers' `usage` counters count each rank's own tokens."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a if not k.endswith(".usage"))


@pytest.mark.parametrize("stage", STAGES)
def test_ep2_matches_ep1_and_reference(trained, stage):
    ep1, ep2 = (trained["ranks"][0][(stage, ep)] for ep in (1, 2))
    reference = trained["reference"]
    for label, run in (("ep_size 1", ep1), ("ep_size 2", ep2)):
        for step, (loss, expected) in enumerate(zip(run["losses"], reference["losses"])):
            assert loss == pytest.approx(expected, abs=TOLERANCE), f"{label}, ZeRO {stage}, step {step}"
        difference, key = _max_difference(run["final"], reference["final"])
        assert difference <= TOLERANCE, (
            f"{label}, ZeRO {stage}: {key} differs from the reference by {difference:.3g}"
        )
    difference, key = _max_difference(ep1["final"], ep2["final"])
    assert difference <= TOLERANCE, f"ZeRO {stage}: {key} differs between ep_size 1 and 2 by {difference:.3g}"


def test_ranks_agree_on_the_gathered_model(trained):
    rank0, rank1 = trained["ranks"]
    for key, run in rank0.items():
        difference, name = _max_difference(run["final"], rank1[key]["final"])
        assert difference == 0.0, f"{key}: ranks disagree on {name}"


def test_zero2_ep2_updates_routers_and_experts(trained):
    final, initial = trained["ranks"][0][(2, 2)]["final"], trained["initial"]
    gates = [k for k in initial if ".router.gates." in k and k.endswith(".weight")]
    experts = [k for k in initial if ".experts." in k]
    assert len(gates) == 4 and len(experts) == 8  # 2 MoE layers x 2 tasks; 2 layers x 4 tensors
    for key in gates + experts:
        change = (final[key] - initial[key]).abs().max().item()
        assert change > 1e-4, f"{key} did not change (max change {change:.3g})"


@pytest.fixture(scope="module")
def trained_on_4_ranks(run_workers):
    per_rank = run_workers(
        parity_worker, world_size=4, timeout_s=300, stages=(0, 2), ep_sizes=(2, 4), steps=STEPS
    )
    return {"ranks": per_rank, "reference": reference_run(STEPS, world_size=4)}


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ep_size"), [(0, 2), (0, 4), (2, 2), (2, 4)])
def test_4_ranks_with_expert_data_parallel_replicas_match_the_reference(trained_on_4_ranks, stage, ep_size):
    """World 4, ep_size 2: each expert lives on 2 ranks, whose gradients must be averaged
    (the expert-data-parallel reduction); ep_size 4: one expert per rank."""
    run, reference = trained_on_4_ranks["ranks"][0][(stage, ep_size)], trained_on_4_ranks["reference"]
    for step, (loss, expected) in enumerate(zip(run["losses"], reference["losses"])):
        assert loss == pytest.approx(expected, abs=TOLERANCE), f"ZeRO {stage}, ep_size {ep_size}, step {step}"
    difference, key = _max_difference(run["final"], reference["final"])
    assert difference <= TOLERANCE, f"ZeRO {stage}, ep_size {ep_size}: {key} differs by {difference:.3g}"


def bf16_worker(steps: int) -> dict:
    import dataclasses

    import torch.distributed as dist

    from moevit.parallel.collectives import all_reduce_sum
    from moevit.parallel.engine import build_engine
    from moevit.parallel.setup import initialize_distributed

    cfg = make_config(2, 1, steps)
    cfg.parallel = dataclasses.replace(cfg.parallel, precision="bf16")
    env = initialize_distributed(cfg, timeout=GROUP_TIMEOUT)
    engine = build_engine(make_model(), cfg, env)
    dtypes = {}

    def record_dtype(module, args, output):
        dtypes.setdefault("attention_linear", output.dtype)

    engine.module.backbone.blocks[0].attn.qkv.register_forward_hook(record_dtype)
    losses = []
    for step in range(steps):
        with torch.no_grad():
            out = engine("a", {"images": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])})
        dtypes.setdefault("routing_weights", next(iter(out.routing.values())).weights_TK.dtype)
        loss = step_loss(engine, step, env.rank, env.world_size)
        engine.backward(loss)
        engine.step()
        losses.append((all_reduce_sum(loss) / env.world_size).item())
    dtypes["parameters"] = {p.dtype for p in engine.module.parameters()}
    dist.destroy_process_group()
    return {"losses": losses, "dtypes": dtypes}


def test_bf16_autocast_trains_with_fp32_weights_and_routing(run_workers):
    results = run_workers(bf16_worker, world_size=2, timeout_s=120, steps=4)
    reference = reference_run(4)["losses"]
    for rank, out in enumerate(results):
        assert out["dtypes"] == {
            "attention_linear": torch.bfloat16,
            "routing_weights": torch.float32,
            "parameters": {torch.float32},
        }
        # bf16 matmuls: close to the fp32 run, not equal (an exact match would mean no autocast).
        differences = [abs(a - b) for a, b in zip(out["losses"], reference)]
        assert max(differences) < 0.05 and max(differences) > 0, (
            f"rank {rank}: {out['losses']} vs {reference}"
        )
