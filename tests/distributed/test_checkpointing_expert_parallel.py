"""Activation checkpointing under expert parallelism (EP=2 on 2 gloo processes): the backward reruns each
MoE block's all-to-alls, and every rank must run the same ones. Trained with and without checkpointing,
the run gives the same losses and weights."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss

pytestmark = pytest.mark.distributed

STEPS = 3


def checkpointing_worker() -> dict:
    import torch.distributed as dist

    from moevit.models.moe_vit import set_activation_checkpointing
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import initialize_distributed

    cfg = make_config(ep_size=2, zero_stage=0, steps=STEPS)
    env = initialize_distributed(cfg, timeout=GROUP_TIMEOUT)
    results = {}
    for checkpointing in (False, True):
        model = make_model()
        set_activation_checkpointing(model, checkpointing)
        engine = build_engine(model, cfg, env)
        losses = []
        for step in range(STEPS):
            loss = step_loss(engine, step, env.rank, env.world_size)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[checkpointing] = {
            "losses": losses,
            "final": gather_single_device_state_dict(engine.module),
            "on": engine.module.backbone.activation_checkpointing and engine.module.training,
        }
    dist.destroy_process_group()
    return results


@pytest.mark.timeout(200)
def test_checkpointed_expert_parallel_training_matches_the_plain_run(run_workers):
    for rank_results in run_workers(checkpointing_worker, world_size=2, timeout_s=180):
        plain, checkpointed = rank_results[False], rank_results[True]
        assert checkpointed["on"] and not plain["on"]
        torch.testing.assert_close(checkpointed["losses"], plain["losses"], rtol=1e-6, atol=0)
        for name, value in plain["final"].items():
            torch.testing.assert_close(checkpointed["final"][name], value, rtol=1e-5, atol=1e-7, msg=name)
