"""Mixture of attention heads: sparse layer against a per-token loop, renormalisation, gradients."""

from __future__ import annotations

import pytest
import torch

import moevit
from moevit.layers.moe_attention import MoEAttention

DIM, HEAD_DIM, EXPERTS, BATCH, TOKENS = 16, 8, 4, 2, 5
TASKS = ("a", "b")


def make_layer(top_k: int = 2, seed: int = 0) -> MoEAttention:
    torch.manual_seed(seed)
    layer = MoEAttention(DIM, EXPERTS, top_k, HEAD_DIM, TASKS)
    with torch.no_grad():
        # Zero-initialised gates route uniformly (ties); random gates make routing differ per token.
        for gate in layer.router.gates.values():
            gate.weight.normal_(std=1.0)
        # Biases start at zero; random ones check that each lands in the right place.
        for bias in (layer.q_bias, layer.kv.bias, layer.o_bias):
            bias.normal_(std=0.1)
    return layer


def reference_forward(layer: MoEAttention, x: torch.Tensor, task: str) -> torch.Tensor:
    """The MoA formula token by token, head by head: routing computed here, not by the router."""
    gate_weight = layer.router.gates[task].weight
    kv_weight, kv_bias = layer.kv.weight, layer.kv.bias
    keys = x @ kv_weight[:HEAD_DIM].T + kv_bias[:HEAD_DIM]
    values = x @ kv_weight[HEAD_DIM:].T + kv_bias[HEAD_DIM:]
    rows = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            probs = (gate_weight @ token).softmax(dim=0)
            selected, experts = probs.topk(layer.top_k)
            weights = selected / selected.sum()
            y = layer.o_bias.clone()
            for weight, e in zip(weights, experts.tolist()):
                query = layer.q_weight[e] @ token + layer.q_bias[e]
                attention = (keys[b] @ query * HEAD_DIM**-0.5).softmax(dim=0)
                y = y + weight * (layer.o_weight[e] @ (attention @ values[b]))
            rows.append(y)
    return torch.stack(rows).view_as(x)


def test_matches_per_token_reference():
    layer = make_layer()
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    y, routing = layer(x, "a")
    expected = reference_forward(layer, x, "a")
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # routing is non-trivial: tokens do not all pick the same heads
    assert len({tuple(row) for row in routing.expert_idx_TK.tolist()}) > 1

    inputs = [x, *layer.parameters()]
    grads = torch.autograd.grad(y.square().sum(), inputs, allow_unused=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:  # task b's gate
            assert grad is None
        else:
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_top1_output_is_the_single_heads_output():
    layer = make_layer(top_k=1)
    x = torch.randn(BATCH, TOKENS, DIM)
    with torch.no_grad():
        y, routing = layer(x, "a")
        keys, values = layer.kv(x).chunk(2, dim=-1)
        for b in range(BATCH):
            for t in range(TOKENS):
                e = routing.expert_idx_TK[b * TOKENS + t, 0].item()
                query = layer.q_weight[e] @ x[b, t] + layer.q_bias[e]
                attention = (keys[b] @ query * HEAD_DIM**-0.5).softmax(dim=0)
                head_output = layer.o_weight[e] @ (attention @ values[b]) + layer.o_bias
                torch.testing.assert_close(y[b, t], head_output, atol=1e-5, rtol=1e-5)
    # Without renormalisation the outputs would be scaled by the raw top-1 probability, well below one.
    raw_top1 = (x.reshape(-1, DIM) @ layer.router.gates["a"].weight.T).softmax(dim=-1).amax(dim=-1)
    assert raw_top1.min() < 0.9


def test_every_parameter_gets_a_gradient_with_forced_balanced_routing():
    layer = make_layer()
    layer.router.force_balanced = True
    x = torch.randn(BATCH, TOKENS, DIM)
    target = torch.randn(BATCH, TOKENS, DIM)
    loss = sum(((layer(x, task)[0] - target) ** 2).sum() for task in TASKS)
    loss.backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    for name in ("q_weight", "q_bias", "o_weight"):  # stacked per expert: every expert's slice
        per_expert = getattr(layer, name).grad.flatten(1).abs().sum(dim=1)
        assert (per_expert > 0).all(), f"{name}: {per_expert.tolist()}"


def test_task_loss_gives_other_tasks_gate_no_gradient():
    layer = make_layer()
    y, _ = layer(torch.randn(BATCH, TOKENS, DIM), "a")
    y.square().sum().backward()
    assert layer.router.gates["a"].weight.grad.abs().sum() > 0
    assert layer.router.gates["b"].weight.grad is None


def test_rejects_wrong_token_width():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"\(batch, tokens, 16\)"):
        layer(torch.randn(BATCH, TOKENS, DIM + 1), "a")


def test_model_with_attention_experts_runs_and_reports_both_routings():
    torch.manual_seed(0)
    model = moevit.create_model("moevit_debug", tasks=["a", "b"], attention_experts=4, attention_top_k=2)
    assert isinstance(model.blocks[1].attn, MoEAttention)
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_backbone(x, "a")
    assert {"blocks.1.attn", "blocks.1.mlp"} <= set(out.routing)
    assert out.routing["blocks.1.attn"].num_experts == 4
    out.tokens.square().mean().backward()
    attention = model.blocks[1].attn
    assert attention.q_weight.grad is not None and attention.q_weight.grad.abs().sum() > 0
    assert attention.kv.weight.grad.abs().sum() > 0
