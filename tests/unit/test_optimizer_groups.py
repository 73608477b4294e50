"""AdamW parameter groups (issue 16): which parameters decay, layer-wise lr decay's layers and scales,
expert groups, frozen parameters, the per-group LR schedule, and what `moevit ckpt reshard` reads of
the groups. Single process; the real engine runs in tests/distributed/test_layer_decay.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moevit.config.schema import OptimConfig
from moevit.continual.freeze import freeze_for_continual
from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import decay_layer
from moevit.parallel.engine import lr_schedule, optimizer_param_groups, warmup_cosine_factor
from moevit.parallel.expert_parallel import apply_expert_parallel
from moevit.parallel.reshard import ExpertLayout, MoeGroupLayout, ReshardError, moe_group_layouts

DEPTH = 4  # moevit_debug: 4 blocks, MoE MLPs on blocks 1 and 3, 4 experts each
DECAY = 0.5


def make_model(attention_experts: int = 0) -> MultiTaskModel:
    """Two classification tasks, task embeddings on, experts sharded the way the engine shards them."""
    torch.manual_seed(0)
    backbone = create_model(
        "moevit_debug", tasks=["a", "b"], task_embedding=True, attention_experts=attention_experts
    )
    heads = {task: build_head("classification", 3, backbone, 32) for task in ("a", "b")}
    return MultiTaskModel(backbone, heads)


def group_of(groups: list[dict], model) -> dict[str, dict]:
    """parameter name -> its group; asserts every trainable parameter is in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(placed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {names[id(p)]: group for group in groups for p in group["params"]}


@pytest.mark.parametrize("layer_decay", [1.0, DECAY])
def test_no_decay_for_norms_biases_embeddings_and_gates(layer_decay):
    model = make_model(attention_experts=2)
    apply_expert_parallel(model, 1)
    group = group_of(optimizer_param_groups(model, 0.05, layer_decay), model)
    no_decay = {name for name, g in group.items() if g["weight_decay"] == 0.0}
    expert = "backbone.blocks.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.2"
    expected_no_decay = {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.task_embed.a",
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.1.mlp.router.gates.b.weight",  # 2-D, but a gate
        "backbone.blocks.3.attn.router.gates.a.weight",  # attention-head experts' gate
        "backbone.blocks.1.attn.q_bias",  # (experts, D): a bias all the same
        f"{expert}.fc1_bias",
        "backbone.norm.bias",
        "heads.a.fc.bias",
    }
    expected_decay = {
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.1.attn.q_weight",
        f"{expert}.fc1_weight",
        "heads.b.fc.weight",
    }
    assert expected_no_decay <= no_decay
    assert not expected_decay & no_decay
    assert all(group[name]["weight_decay"] == 0.05 for name in expected_decay)
    # Every 2-D+ parameter that decays is a weight matrix: nothing else slipped into a decaying group.
    assert all(name.endswith("weight") for name in set(group) - no_decay)


def test_layer_ids_and_scales_follow_beit():
    model = make_model()
    apply_expert_parallel(model, 1)
    groups = optimizer_param_groups(model, 0.05, DECAY)
    group = group_of(groups, model)
    expert = "backbone.blocks.3.mlp.experts.deepspeed_moe.experts.deepspeed_experts.0.fc2_weight"
    expected_layer = {
        "backbone.pos_embed": 0,
        "backbone.cls_token": 0,
        "backbone.patch_embed.proj.weight": 0,
        "backbone.task_embed.b": 0,
        "backbone.blocks.0.attn.qkv.weight": 1,
        "backbone.blocks.1.mlp.router.gates.a.weight": 2,  # a gate lives in its block
        "backbone.blocks.2.mlp.fc1.bias": 3,
        expert: 4,
        "backbone.norm.weight": DEPTH + 1,
        "heads.a.fc.weight": DEPTH + 1,
    }
    for name, layer in expected_layer.items():
        assert group[name]["layer_id"] == layer, name
        assert group[name]["lr_scale"] == pytest.approx(DECAY ** (DEPTH + 1 - layer)), name
    assert group["heads.b.fc.bias"]["lr_scale"] == 1.0
    assert group["backbone.blocks.0.norm1.bias"]["lr_scale"] == pytest.approx(DECAY**DEPTH)
    # The first group trains at the full lr: what the training log reports as the lr.
    assert groups[0]["lr_scale"] == 1.0
    # Experts sit in DeepSpeed's expert groups, one pair (decay, no decay) per MoE layer.
    moe = [(g["name"], g["layer_id"], g["weight_decay"]) for g in groups if g.get("moe")]
    assert moe == [
        ("ep_size_1", 4, 0.05),
        ("ep_size_1", 4, 0.0),
        ("ep_size_1", 2, 0.05),
        ("ep_size_1", 2, 0.0),
    ]
    assert all(
        g.get("moe") for g in groups if any(getattr(p, "allreduce", True) is False for p in g["params"])
    )


def test_layer_decay_off_keeps_the_two_groups_checkpoints_were_saved_with():
    model = make_model()
    apply_expert_parallel(model, 1)
    groups = optimizer_param_groups(model, 0.05)
    assert [(g["name"], g.get("moe", False), g["lr_scale"]) for g in groups] == [
        ("decay", False, 1.0),
        ("no_decay", False, 1.0),
        ("ep_size_1", True, 1.0),
        ("ep_size_1", True, 1.0),
    ]
    assert not any("layer_id" in g for g in groups)


def test_frozen_parameters_stay_out_of_every_group_with_layer_decay():
    model = make_model()
    freeze_for_continual(model, ["b"], frozen_experts=2)  # experts 0, 1 and the shared weights frozen
    apply_expert_parallel(model, 1)
    groups = optimizer_param_groups(model, 0.5, DECAY)
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable
    assert len(trainable) < len(list(model.parameters()))
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_decay_layer_names_unplaced_backbone_parameters():
    assert decay_layer("heads.a.fc.weight", DEPTH) == DEPTH + 1
    assert decay_layer("blocks.3.attn.qkv.weight", DEPTH, prefix="") == 4
    with pytest.raises(ValueError, match="'backbone.register_tokens': no layer-decay layer"):
        decay_layer("backbone.register_tokens", DEPTH)


def test_layer_decay_needs_a_moevit_backbone():
    with pytest.raises(ValueError, match="layer_decay < 1 needs a MoEViT backbone; Linear has none"):
        optimizer_param_groups(torch.nn.Linear(2, 2), 0.05, DECAY)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=rf"layer_decay must be in \(0, 1\] \(1: off\), got {value}"):
        OptimConfig(layer_decay=value).validate()
    OptimConfig(layer_decay=0.65).validate()


def test_schedule_multiplies_each_groups_scale_and_round_trips():
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2, layer_decay=DECAY)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    scales = [1.0, DECAY, DECAY**3]
    groups = [{"params": [p], "lr_scale": s} for p, s in zip(params, scales)] + [
        {"params": [torch.nn.Parameter(torch.zeros(2))]}  # a group saved before layer decay: scale 1
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr)
    scheduler = lr_schedule(optim, total_steps=10)(optimizer)
    for step in range(6):
        factor = warmup_cosine_factor(step, 2, 10, optim.min_lr / optim.lr)
        got = [g["lr"] for g in optimizer.param_groups]
        assert got == pytest.approx([optim.lr * factor * s for s in [*scales, 1.0]]), step
        optimizer.step()
        scheduler.step()
    resumed_optimizer = torch.optim.AdamW(
        [{**g, "params": [torch.nn.Parameter(torch.zeros(2))]} for g in groups], lr=optim.lr
    )
    resumed = lr_schedule(optim, total_steps=10)(resumed_optimizer)
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_optimizer.step()
    resumed.step()
    factor = warmup_cosine_factor(7, 2, 10, optim.min_lr / optim.lr)
    got = [g["lr"] for g in resumed_optimizer.param_groups]
    assert got == pytest.approx([optim.lr * factor * s for s in [*scales, 1.0]])


def _moe_groups(*layer_ids) -> list[dict]:
    dense = [{"name": "layer_5_decay", "params": [0], "layer_id": 5}]
    return dense + [{"name": "ep_size_2", "moe": True, "params": [], "layer_id": i} for i in layer_ids]


LAYOUT = ExpertLayout(2, 4, (("fc1_weight", (8, 4)), ("fc2_weight", (4, 8)), ("fc1_bias", (8,))))


def test_reshard_reads_which_moe_layer_each_group_holds():
    groups = _moe_groups(4, 4, 2, 2)  # top layer first, decay before no decay
    assert moe_group_layouts(groups, LAYOUT, Path("ckpt")) == {
        1: MoeGroupLayout((1,), (0, 1)),
        2: MoeGroupLayout((1,), (2,)),
        3: MoeGroupLayout((0,), (0, 1)),
        4: MoeGroupLayout((0,), (2,)),
    }
    merged = [{"name": "ep_size_2", "moe": True, "params": []} for _ in range(2)]
    assert moe_group_layouts(merged, LAYOUT, Path("ckpt")) == {
        0: MoeGroupLayout((0, 1), (0, 1)),
        1: MoeGroupLayout((0, 1), (2,)),
    }


@pytest.mark.parametrize(
    "groups, message",
    [
        (_moe_groups(4, 4), r"cover layer_ids \[4\], the expert files 2 MoE layers"),
        (_moe_groups(4, 4, 2), "1 MoE optimizer groups with layer_id 2, expected 2"),
        (_moe_groups(4, 4, None, None), r"cover layer_ids \[4\] and all layers"),
    ],
)
def test_reshard_refuses_groups_it_cannot_place(groups, message):
    with pytest.raises(ReshardError, match=message):
        moe_group_layouts(groups, LAYOUT, Path("ckpt"))
