"""bf16 training on the CPU through the real DeepSpeed engine (one gloo process): parallel.precision=bf16
reaches DeepSpeed as torch_autocast, the forward computes in bf16 while the weights stay fp32, and the
real training step (task losses, aux losses, MI) lowers the loss. The same run with activation
checkpointing gives the same losses: the engine's reduction and the recomputation work together."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_fixtures import GROUP_TIMEOUT, TASK_CLASSES, global_batch, make_config, make_model

pytestmark = pytest.mark.distributed

STEPS = 6


def bf16_config(checkpointing: bool):
    cfg = make_config(ep_size=1, zero_stage=0, steps=STEPS, grad_clip=1.0)
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, precision="bf16"),
        train=dataclasses.replace(cfg.train, activation_checkpointing=checkpointing),
    )


def bf16_worker() -> dict:
    import torch.distributed as dist

    from moevit.config.schema import AuxLossConfig
    from moevit.data.multitask import StepPlan, TaskBatch
    from moevit.models.moe_vit import set_activation_checkpointing
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import initialize_distributed
    from moevit.train.step import MultiTaskStep

    env = initialize_distributed(bf16_config(False), timeout=GROUP_TIMEOUT)
    results = {}
    for checkpointing in (False, True):
        cfg = bf16_config(checkpointing)
        model = make_model()
        set_activation_checkpointing(model, cfg.train.activation_checkpointing)
        initial = {name: value.clone() for name, value in model.state_dict().items()}
        engine = build_engine(model, cfg, env)
        dtypes = set()
        engine.module.backbone.blocks[0].attn.qkv.register_forward_hook(
            lambda m, i, out, dtypes=dtypes: dtypes.add(out.dtype)
        )
        aux = AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.1)
        step = MultiTaskStep(engine, list(TASK_CLASSES), aux, {"a": 0.5, "b": 0.5}, 1, torch.device("cpu"))
        plan = StepPlan(0, tuple(TaskBatch(task, global_batch(0, task)) for task in TASK_CLASSES))
        losses = [step(plan, dict.fromkeys(TASK_CLASSES, 1.0)).total for _ in range(STEPS)]
        final = gather_single_device_state_dict(engine.module)  # experts back in the single-device layout
        results[checkpointing] = {
            "losses": losses,
            "autocast": (engine.torch_autocast_enabled(), engine.torch_autocast_dtype()),
            "fp16": engine.fp16_enabled(),
            "bf16_weights": engine.bfloat16_enabled(),
            "forward_dtypes": dtypes,
            "param_dtypes": {p.dtype for p in engine.module.parameters()},
            "changed": sum(not torch.equal(initial[n], v) for n, v in final.items()),
            "params": len(initial),
        }
    dist.destroy_process_group()
    return results


@pytest.mark.timeout(180)
def test_bf16_trains_through_the_engine_with_and_without_checkpointing(run_workers):
    (results,) = run_workers(bf16_worker, world_size=1, timeout_s=150)
    plain = results[False]
    assert plain["autocast"] == (True, torch.bfloat16)
    assert not plain["fp16"] and not plain["bf16_weights"]  # autocast, not DeepSpeed's bf16 weights
    assert plain["forward_dtypes"] == {torch.bfloat16}
    assert plain["param_dtypes"] == {torch.float32}
    assert all(torch.isfinite(torch.tensor(plain["losses"])))
    assert plain["losses"][-1] < plain["losses"][0]
    assert plain["changed"] > 0.9 * plain["params"]
    # Activation checkpointing replays the same bf16 forward: the same run, loss for loss.
    checkpointed = results[True]
    assert checkpointed["forward_dtypes"] == {torch.bfloat16}
    torch.testing.assert_close(checkpointed["losses"], plain["losses"], rtol=1e-5, atol=0)
