"""Parameter and FLOP counts: hand-written formulas, fvcore agreement, top-k scaling, reports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import moevit
from moevit.models.flops import (
    analytic_flops,
    count_parameters,
    flops_report,
    format_flops_table,
    fvcore_flops,
    run_flops,
)

# A model small enough to count by hand: D=8, 3 channels, patch 4 on 8x8 images (4 patches +
# class token = 5 tokens), 2 blocks of which block 1 is MoE with E=4, K=2, expert hidden 4D.
D, C, P, IMG, E, K, TASKS = 8, 3, 4, 8, 4, 2, ("a", "b")
# docs/performance.md promises that analytic and fvcore counts "agree to <0.01 %" (after fvcore's
# conventions); the differences measured on these models are 0 to 3e-8, float rounding of the totals.
PROMISED_AGREEMENT = 1e-4
TINY = dict(
    img_size=IMG, patch_size=P, embed_dim=D, depth=2, num_heads=2, num_experts=E, top_k=K,
    moe_layers=[1], task_embedding=True,
)  # fmt: skip


def make(name: str = "moevit_debug", tasks=TASKS, **overrides):
    torch.manual_seed(0)
    return moevit.create_model(name, tasks=list(tasks), **overrides)


def test_parameter_counts_match_hand_formula():
    counts = count_parameters(make(**TINY))

    patch_embed = C * P * P * D + D
    class_and_position = D + (1 + (IMG // P) ** 2) * D
    task_embedding = D  # one per task
    norms_per_block = 2 * 2 * D
    attention = (D * 3 * D + 3 * D) + (D * D + D)
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)  # the dense MLP, and each expert
    gate = E * D  # one per task per MoE layer
    final_norm = 2 * D
    dense_block = norms_per_block + attention + mlp
    moe_block = norms_per_block + attention + E * mlp + len(TASKS) * gate
    total = (
        patch_embed + class_and_position + len(TASKS) * task_embedding + dense_block + moe_block + final_norm
    )
    per_task = total - gate - task_embedding  # without the other task's gate and embedding
    active = per_task - (E - K) * mlp

    assert (total, per_task, active) == (3936, 3896, 2792)  # the formula above, evaluated by hand
    assert counts == {
        "total": total,
        "per_task": {"a": per_task, "b": per_task},
        "active_per_token": {"a": active, "b": active},
    }


def test_parameter_counts_with_mixture_of_attention_heads():
    head_experts, head_top_k, head_dim = 3, 1, 4
    plain = count_parameters(make(**TINY))
    counts = count_parameters(
        make(**TINY, attention_experts=head_experts, attention_top_k=head_top_k, attention_head_dim=head_dim)
    )

    attention = (D * 3 * D + 3 * D) + (D * D + D)  # the dense attention MoA replaces in block 1
    mlp_expert = (D * 4 * D + 4 * D) + (4 * D * D + D)
    head_expert = (head_dim * D + head_dim) + D * head_dim  # its query (with bias) and output projection
    shared = (D * 2 * head_dim + 2 * head_dim) + D  # key/value projection and the one output bias
    gate = head_experts * D
    moa = head_experts * head_expert + shared + len(TASKS) * gate
    per_task = plain["per_task"]["a"] - attention + moa - gate
    active = per_task - (E - K) * mlp_expert - (head_experts - head_top_k) * head_expert
    assert counts["total"] == plain["total"] - attention + moa
    assert counts["per_task"]["a"] == per_task
    assert counts["active_per_token"]["a"] == active


@pytest.mark.parametrize("num_experts, top_k", [(4, 2), (2, 2)])
def test_active_parameters_are_fewer_only_when_experts_are_left_out(num_experts, top_k):
    counts = count_parameters(make(num_experts=num_experts, top_k=top_k))
    for task in TASKS:
        if num_experts > top_k:
            assert counts["active_per_token"][task] < counts["per_task"][task] < counts["total"]
        else:
            assert counts["active_per_token"][task] == counts["per_task"][task] < counts["total"]


def test_analytic_flops_match_hand_formula_on_a_non_square_image():
    height, width = 8, 12
    result = analytic_flops(make(**TINY), (height, width), "a")
    patches = (height // P) * (width // P)
    tokens = 1 + patches
    heads, head_dim = 2, D // 2
    assert result["tokens"] == tokens
    expected_macs = {
        "patch_embed": patches * C * P * P * D,
        "attention_projections": 2 * tokens * (3 * D * D + D * D),
        "attention_sdpa": 2 * 2 * heads * tokens * tokens * head_dim,  # 2 blocks x (Q K^T and A V)
        "mlp_dense": tokens * 2 * D * 4 * D,
        "routers": tokens * D * E,
        "mlp_experts": tokens * K * 2 * D * 4 * D,
        "expert_combine": tokens * K * D,
    }
    for component, macs in expected_macs.items():
        assert result["flops"][component] == 2 * macs, component
    assert sum(result["flops"].values()) == 2 * sum(expected_macs.values())
    assert result["gflops"] == pytest.approx(2 * sum(expected_macs.values()) / 1e9)
    assert result["gflops_sdpa"] == pytest.approx(2 * expected_macs["attention_sdpa"] / 1e9)


def test_windowed_attention_flops_count_padded_windows_and_the_prefix_call():
    # 8x12 image: a 2x3 grid, padded to 2x4 for 2x2 windows (2 windows of 4 tokens); block 1 stays global.
    windowed = analytic_flops(make(**TINY, window_size=2, global_blocks=[1]), (8, 12), "a")
    plain = analytic_flops(make(**TINY), (8, 12), "a")
    heads, head_dim, tokens = 2, D // 2, 1 + 6
    window_rows, prefix_rows = 2 * 4, 1
    assert windowed["tokens"] == tokens
    assert windowed["flops"]["attention_projections"] == 2 * (window_rows + prefix_rows + tokens) * 4 * D * D
    assert windowed["flops"]["attention_sdpa"] == 2 * 2 * heads * head_dim * (
        2 * 4 * 4 + 1 * 1 + tokens * tokens
    )
    unchanged = [c for c in plain["flops"] if not c.startswith("attention_")]
    assert {c: windowed["flops"][c] for c in unchanged} == {c: plain["flops"][c] for c in unchanged}


def test_windowed_sdpa_count_matches_fvcore_when_attention_is_unfused():
    model = make(window_size=3, global_blocks=[1])  # 3x3 windows on the 4x4 grid: padded to 6x6
    for block in model.blocks:
        block.attn.fused_attn = False
    analytic = analytic_flops(model, 32, "a")
    assert fvcore_flops(model, 32, "a")["gflops"] == pytest.approx(analytic["gflops"], rel=1e-6)


def test_a_model_built_on_the_meta_device_counts_the_same():
    """Sizing a full-size config (`moevit plan`) builds it on the meta device, without allocating it."""
    overrides = dict(window_size=3, global_blocks=[1], img_size=64)
    with torch.device("meta"):
        meta = moevit.create_model("moevit_debug", tasks=list(TASKS), **overrides)
    assert next(meta.parameters()).is_meta
    real = make(**overrides)
    assert analytic_flops(meta, (64, 40), "a") == analytic_flops(real, (64, 40), "a")
    assert count_parameters(meta) == count_parameters(real)


def test_expert_flops_scale_with_top_k_not_with_num_experts():
    def expert_flops(num_experts, top_k):
        return analytic_flops(make(num_experts=num_experts, top_k=top_k), 32, "a")["flops"]["mlp_experts"]

    assert expert_flops(4, 2) == 2 * expert_flops(4, 1)
    assert expert_flops(8, 2) == expert_flops(4, 2)


@pytest.mark.parametrize(
    "name, image_size, overrides",
    [
        ("moevit_debug", 32, {}),
        ("moevit_debug", (32, 48), {"task_embedding": True}),  # resampled position embedding
        ("moevit_tiny", 224, {}),
        ("moevit_tiny", (224, 160), {"window_size": 4, "global_blocks": [2, 5, 8, 11]}),  # padded windows
    ],
)
def test_fvcore_agrees_with_analytic_where_it_counts(name, image_size, overrides):
    model = make(name, **overrides)
    analytic = analytic_flops(model, image_size, "b")
    counted = fvcore_flops(model, image_size, "b")
    assert counted["gflops"] == pytest.approx(analytic["gflops_without_sdpa"], rel=PROMISED_AGREEMENT)
    assert "aten::scaled_dot_product_attention" in counted["unsupported_ops"]


def test_sdpa_count_matches_fvcore_when_attention_is_unfused():
    """timm's unfused attention runs Q K^T and A V as matmuls, which fvcore does count."""
    model = make()
    for block in model.blocks:
        block.attn.fused_attn = False
    analytic = analytic_flops(model, 32, "a")
    counted = fvcore_flops(model, 32, "a")
    assert "aten::scaled_dot_product_attention" not in counted["unsupported_ops"]
    assert counted["gflops"] == pytest.approx(analytic["gflops"], rel=1e-6)


def test_mixture_of_attention_heads_flops():
    def moa(top_k):
        model = make(attention_experts=4, attention_top_k=top_k, attention_head_dim=16)
        return model, analytic_flops(model, 32, "a")

    model, analytic = moa(top_k=2)
    tokens = analytic["tokens"]
    moe_blocks = len(model.moe_layer_indices)
    assert analytic["flops"]["moa_sdpa"] == moe_blocks * 2 * 2 * (tokens * 2) * tokens * 16
    assert analytic["flops"]["moa_head_experts"] == 2 * moa(top_k=1)[1]["flops"]["moa_head_experts"]
    counted = fvcore_flops(model, 32, "a")
    assert counted["gflops"] == pytest.approx(analytic["gflops_without_sdpa"], rel=PROMISED_AGREEMENT)


def test_fvcore_count_restores_routing_and_training_state():
    model = make().train()
    model.blocks[0].eval()
    fvcore_flops(model, 32, "a")
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(not router.force_balanced for _, router in model.routers())
    model.set_force_balanced_routing(True)
    fvcore_flops(model, 32, "a")
    assert all(router.force_balanced for _, router in model.routers())


def test_head_flops_are_reported_apart_from_the_backbone():
    model = make()
    without = fvcore_flops(model, 32, "a")
    with_head = fvcore_flops(model, 32, "a", head=nn.Linear(64, 10))
    tokens = analytic_flops(model, 32, "a")["tokens"]
    assert with_head["gflops_head"] == pytest.approx(2 * tokens * 64 * 10 / 1e9)
    assert with_head["gflops"] == pytest.approx(without["gflops"])


def test_report_table_and_json():
    model = make()
    report = flops_report(model, {"a": 32, "b": 48})
    assert list(report["tasks"]) == list(TASKS)
    row = report["tasks"]["b"]
    assert row["image_size"] == [48, 48] and row["tokens"] == 1 + 36
    assert abs(row["relative_difference"]) < PROMISED_AGREEMENT
    assert row["gflops_analytic"] > row["gflops_fvcore"]  # fvcore leaves SDPA out
    table = format_flops_table(report)
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["a", "b"]
    assert json.loads(run_flops(model, {"a": 32, "b": 48}, as_json=True))["tasks"]["a"] == json.loads(
        json.dumps(report["tasks"]["a"])
    )


def test_bad_input_is_named():
    model = make()
    with pytest.raises(ValueError, match="missing \\['b'\\], unknown \\['c'\\]"):
        flops_report(model, {"a": 32, "c": 32})
    with pytest.raises(ValueError, match="30x32 must be a positive multiple of the patch size 8"):
        analytic_flops(model, (30, 32), "a")
    with pytest.raises(ValueError, match="an int or \\(height, width\\), got \\(32, 32, 32\\)"):
        analytic_flops(model, (32, 32, 32), "a")
    with pytest.raises(KeyError, match="unknown task 'z'"):
        fvcore_flops(model, 32, "z")
