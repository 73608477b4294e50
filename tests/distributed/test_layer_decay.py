"""Layer-wise lr decay through the real DeepSpeed engine (issue 16), on 1 process: after one step each
parameter moved exactly as torch's AdamW moves it at lr x factor x layer_decay ** (n + 1 - layer), with
weight decay only where the groups say so; ZeRO 1 and 2 take the same step. moevit_debug has n = 4
blocks (MoE MLPs on blocks 1 and 3).

AdamW's first step is p <- p (1 - lr wd) - lr g / (|g| + eps) (both moments' bias corrections cancel),
so the update of every element shows the lr its group trained at, without a reference optimizer.
"""

from __future__ import annotations

import pytest
from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss

pytestmark = pytest.mark.distributed

DECAY, DEPTH, EPS = 0.5, 4, 1e-8
EXPERT = "backbone.blocks.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.0.fc1_weight"
# name: (layer, decays)
WATCHED = {
    "backbone.pos_embed": (0, False),
    "backbone.blocks.0.attn.qkv.weight": (1, True),
    "backbone.blocks.0.norm1.bias": (1, False),
    EXPERT: (2, True),
    "backbone.blocks.3.mlp.router.gates.a.weight": (4, False),
    "heads.a.fc.weight": (DEPTH + 1, True),
}


def one_step_worker(stages: tuple[int, ...]) -> dict:
    """{ZeRO stage: the watched parameters' lr, weights before and after one step (and gradients, at
    stage 0, where DeepSpeed leaves them on the parameters), the lr the log would report}."""
    import torch.distributed as dist

    from moevit.parallel.engine import build_engine
    from moevit.parallel.setup import initialize_distributed

    env = initialize_distributed(make_config(1, 0, steps=10), timeout=GROUP_TIMEOUT)
    results = {}
    for stage in stages:
        cfg = make_config(1, stage, steps=10, grad_clip=0.0, layer_decay=DECAY)
        engine = build_engine(make_model(seed=0), cfg, env)
        params = dict(engine.module.named_parameters())
        group_lr = {id(p): group["lr"] for group in engine.optimizer.param_groups for p in group["params"]}
        out = {"lr": {name: group_lr.get(id(params[name])) for name in WATCHED}}
        out["before"] = {name: params[name].detach().clone() for name in WATCHED}
        engine.backward(step_loss(engine, 0, 0, 1))
        if stage == 0:
            out["grad"] = {name: params[name].grad.detach().clone() for name in WATCHED}
        engine.step()
        out["after"] = {name: params[name].detach().clone() for name in WATCHED}
        out["logged_lr"] = engine.get_lr()[0]
        results[stage] = out
    dist.destroy_process_group()
    return results


@pytest.mark.timeout(180)
def test_each_parameter_steps_at_its_layers_lr_for_every_zero_stage(run_workers):
    from moevit.parallel.engine import warmup_cosine_factor

    (results,) = run_workers(one_step_worker, world_size=1, timeout_s=150, stages=(0, 1, 2))
    out = results[0]
    optim = make_config(1, 0, steps=10, layer_decay=DECAY).train.optim
    base = optim.lr * warmup_cosine_factor(0, optim.warmup_steps, 10, optim.min_lr / optim.lr)
    for name, (layer, decays) in WATCHED.items():
        lr = base * DECAY ** (DEPTH + 1 - layer)
        assert out["lr"][name] == pytest.approx(lr, rel=1e-12), name
        before, grad = out["before"][name].double(), out["grad"][name].double()
        assert grad.abs().max() > 0, f"{name} got no gradient: the check would not see its lr"
        shrink = 1 - lr * optim.weight_decay if decays else 1.0
        expected = before * shrink - lr * grad / (grad.abs() + EPS)
        # fp32 rounding of the weights is far below 1e-3 lr; the wrong layer would be off by lr / 2.
        difference = (out["after"][name].double() - expected).abs().max().item()
        assert difference < 1e-3 * lr, f"{name}: off by {difference:.3g} from lr {lr:.4g}"
    # Block 0 trains at lr x decay ** n; the log reports the full lr (of the next step).
    assert out["lr"]["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(base * DECAY**DEPTH)
    assert out["logged_lr"] == pytest.approx(
        optim.lr * warmup_cosine_factor(1, optim.warmup_steps, 10, optim.min_lr / optim.lr)
    )
    # ZeRO 1 and 2 keep flat fp32 partitions per group: the same groups, lrs and step.
    for stage in (1, 2):
        for name in WATCHED:
            difference = (results[stage]["after"][name] - out["after"][name]).abs().max().item()
            assert difference <= 1e-7, f"ZeRO {stage}: {name} differs from ZeRO 0 by {difference:.3g}"
        assert results[stage]["logged_lr"] == out["logged_lr"]
