"""The optional expert capacity bound (model.moe.capacity_factor): which slots drop, what they contribute."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moevit.config.errors import ConfigError
from moevit.config.loader import build_config
from moevit.config.schema import Config
from moevit.layers import MoEMlp, plan_dispatch
from moevit.layers.capacity import expert_capacity, slots_within_capacity
from moevit.layers.router import Routing
from moevit.models import create_model
from moevit.models.block import TaskBlock

DIM, HIDDEN = 8, 16

# Hand-built top-2 routing over 3 experts, capacity 2 per expert. Each expert keeps first choices
# before second choices, then larger weights (moevit.layers.capacity):
#   expert 0, first choices t0 .52, t1 .90, t3 .55, t4 .51 -> keeps t1, t3; drops t0, t4; t2's second
#             choice (.30) comes after every first choice -> dropped
#   expert 1, first choice t2 .70 -> kept; second choices t4 .49, t0 .48, t3 .45 -> keeps t4 only
#   expert 2, t1's second choice -> kept
# Token 0 loses both slots (flat slots 0 and 1); a token-order rule would have kept t0 over t3.
EXPERT_IDX_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [0, 1]])
WEIGHTS_TK = torch.tensor([[0.52, 0.48], [0.90, 0.10], [0.70, 0.30], [0.55, 0.45], [0.51, 0.49]])
CAPACITY = 2
KEPT_SLOTS = [2, 3, 4, 6, 9]  # flat t * 2 + k


def test_capacity_is_the_ceiling_of_the_factor_times_the_even_share():
    assert expert_capacity(num_slots=40, num_experts=4, capacity_factor=1.0) == 10
    assert expert_capacity(num_slots=40, num_experts=4, capacity_factor=1.25) == 13  # 12.5 -> 13
    assert expert_capacity(num_slots=30, num_experts=3, capacity_factor=0.1) == 1  # not 2 from float error
    assert expert_capacity(num_slots=3, num_experts=16, capacity_factor=1.0) == 1


def test_tight_capacity_keeps_exactly_the_prioritised_slots():
    kept = slots_within_capacity(EXPERT_IDX_TK, WEIGHTS_TK, num_experts=3, capacity=CAPACITY)
    assert kept.tolist() == KEPT_SLOTS
    plan = plan_dispatch(EXPERT_IDX_TK, 3, kept)
    assert plan.counts_E.tolist() == [2, 2, 1]
    assert plan.num_dropped == 5
    # Rows of one expert in token order, as in the dropless plan.
    assert plan.sort_order_S.tolist() == [2, 6, 4, 9, 3]
    assert plan.token_of_row_S.tolist() == [1, 3, 2, 4, 1]


def test_keeping_every_slot_gives_the_dropless_plan():
    dropless = plan_dispatch(EXPERT_IDX_TK, 3)
    kept = slots_within_capacity(EXPERT_IDX_TK, WEIGHTS_TK, num_experts=3, capacity=10)
    bounded = plan_dispatch(EXPERT_IDX_TK, 3, kept)
    assert bounded.num_dropped == 0
    for name in ("sort_order_S", "token_of_row_S", "counts_E", "unsort_order_S"):
        assert torch.equal(getattr(bounded, name), getattr(dropless, name)), name


def _randomised_moe(capacity_factor=None, num_experts=4, top_k=2):
    torch.manual_seed(0)
    moe = MoEMlp(DIM, HIDDEN, num_experts, top_k, ["a"], capacity_factor=capacity_factor)
    torch.nn.init.normal_(moe.router.gates["a"].weight)
    for bias in (moe.experts.fc1_bias, moe.experts.fc2_bias):
        torch.nn.init.normal_(bias, std=0.1)
    return moe


def _forward_backward(moe, x):
    x = x.clone().requires_grad_()
    y, routing = moe(x, "a")
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return y.detach(), x.grad, grads, routing


def test_large_capacity_equals_dropless_bit_for_bit():
    x = torch.randn(2, 9, DIM)
    y_ref, x_grad_ref, grads_ref, routing_ref = _forward_backward(_randomised_moe(None), x)
    # Factor E / K: capacity = T, an expert cannot receive more than one slot per token.
    y, x_grad, grads, routing = _forward_backward(_randomised_moe(2.0), x)
    assert routing_ref.dropped_slots is None and routing.dropped_slots == 0
    assert torch.equal(y, y_ref) and torch.equal(x_grad, x_grad_ref)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name]), name


def _hand_routed_moe(monkeypatch, capacity_factor):
    """A 3-expert top-2 layer whose router returns the hand-built routing above (weights differentiable)."""
    torch.manual_seed(1)
    moe = MoEMlp(DIM, HIDDEN, 3, 2, ["a"], capacity_factor=capacity_factor)
    for bias in (moe.experts.fc1_bias, moe.experts.fc2_bias):
        torch.nn.init.normal_(bias, std=0.1)
    weights = WEIGHTS_TK.clone().requires_grad_()

    def route(x_TD, task):
        return Routing(
            task=task,
            expert_idx_TK=EXPERT_IDX_TK,
            weights_TK=weights,
            probs_sum_E=torch.zeros(3),
            counts_E=torch.bincount(EXPERT_IDX_TK.flatten(), minlength=3),
            z_loss=torch.zeros(()),
        )

    monkeypatch.setattr(moe.router, "forward", route)
    return moe, weights


def _expert(moe, e, x_D):
    experts = moe.experts
    h = F.gelu(x_D @ experts.fc1_weight[e].T + experts.fc1_bias[e])
    return h @ experts.fc2_weight[e].T + experts.fc2_bias[e]


def test_dropped_slots_contribute_nothing_and_kept_ones_keep_their_weight(monkeypatch):
    # 10 slots over 3 experts at factor 0.6: capacity ceil(0.6 * 10 / 3) = 2.
    moe, _ = _hand_routed_moe(monkeypatch, capacity_factor=0.6)
    x = torch.randn(5, DIM)
    y, routing = moe(x, "a")
    assert routing.dropped_slots == 5
    assert routing.counts_E.tolist() == [5, 4, 1]  # the router's choice, before the drop
    kept = set(KEPT_SLOTS)
    for t in range(5):
        expected = torch.zeros(DIM)
        for k in range(2):
            if t * 2 + k in kept:  # not renormalised over the kept slots
                expected = expected + WEIGHTS_TK[t, k] * _expert(moe, EXPERT_IDX_TK[t, k].item(), x[t])
        torch.testing.assert_close(y[t], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(y[0], torch.zeros(DIM))  # every slot dropped: no MoE output at all


def test_gradients_reach_only_the_kept_experts_of_a_token(monkeypatch):
    moe, weights = _hand_routed_moe(monkeypatch, capacity_factor=0.6)
    x = torch.randn(5, DIM, requires_grad=True)
    y, _ = moe(x, "a")
    y[4].sum().backward()  # token 4: expert 0 (first choice) dropped, expert 1 kept
    assert moe.experts.fc1_weight.grad[0].abs().sum() == 0
    assert moe.experts.fc2_bias.grad[0].abs().sum() == 0
    assert moe.experts.fc1_weight.grad[1].abs().sum() > 0
    assert weights.grad[4, 0] == 0 and weights.grad[4, 1] != 0
    assert x.grad[4].abs().sum() > 0 and x.grad[:4].abs().sum() == 0

    moe.zero_grad()
    x.grad = None
    y, _ = moe(x, "a")
    y[0].sum().backward()  # token 0: both slots dropped, nothing learns from it
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in moe.experts.parameters())
    assert x.grad.abs().sum() == 0


class _NoMlp(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_a_token_with_every_slot_dropped_passes_the_residual_unchanged(monkeypatch):
    torch.manual_seed(2)
    block = TaskBlock(DIM, num_heads=2, mlp_ratio=2.0)
    moe, _ = _hand_routed_moe(monkeypatch, capacity_factor=0.6)
    block.mlp = moe
    without_mlp = copy.deepcopy(block)
    without_mlp.mlp = _NoMlp()
    x = torch.randn(1, 5, DIM)
    y, _ = block(x, "a", (1, 5))
    y_residual_only, _ = without_mlp(x, "a", (1, 5))
    assert torch.equal(y[0, 0], y_residual_only[0, 0])  # token 0 lost both slots
    assert not torch.allclose(y[0, 1], y_residual_only[0, 1])  # token 1 kept both


def test_auxiliary_statistics_do_not_depend_on_the_bound():
    x = torch.randn(3, 7, DIM)
    _, routing_ref = _randomised_moe(None)(x, "a")
    _, routing = _randomised_moe(0.5)(x, "a")
    assert routing.dropped_slots > 0
    for name in ("expert_idx_TK", "weights_TK", "probs_sum_E", "counts_E", "z_loss"):
        assert torch.equal(getattr(routing, name), getattr(routing_ref, name)), name


def test_a_restricted_task_shares_its_slots_among_the_experts_it_reaches():
    torch.manual_seed(3)
    moe = MoEMlp(DIM, HIDDEN, 8, 2, ["a", "old"], task_experts={"old": 2}, capacity_factor=1.0)
    # Two reachable experts get every slot of 'old': its even share is T*K/2 = T, so nothing drops.
    _, routing = moe(torch.randn(6, DIM), "old")
    assert routing.dropped_slots == 0


def test_config_reaches_every_moe_layer_and_is_validated():
    model = create_model("moevit_debug", tasks=["a"], capacity_factor=1.5)
    layers = list(model.mlp_layers().values())
    assert layers and all(layer.capacity_factor == 1.5 for layer in layers)
    cfg = build_config(
        Config,
        {
            "tasks": {"a": {"type": "classification", "num_classes": 3}},
            "model": {"moe": {"capacity_factor": 2}},
        },
    )
    assert cfg.model.variant_overrides()["capacity_factor"] == 2
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="capacity_factor"):
            build_config(
                Config,
                {
                    "tasks": {"a": {"type": "classification", "num_classes": 3}},
                    "model": {"moe": {"capacity_factor": bad}},
                },
            )
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoEMlp(DIM, HIDDEN, 4, 2, ["a"], capacity_factor=0.0)


def test_a_restricted_task_drops_as_before_the_experts_added_after_it():
    """Continual learning keeps old tasks exact with a bound too: their capacity counts the n experts
    they reach, so adding experts for new tasks changes neither their routing nor their drops."""
    torch.manual_seed(4)
    before = MoEMlp(DIM, HIDDEN, 3, 2, ["old"], capacity_factor=0.7)
    torch.nn.init.normal_(before.router.gates["old"].weight)
    after = MoEMlp(DIM, HIDDEN, 5, 2, ["old", "new"], task_experts={"old": 3}, capacity_factor=0.7)
    with torch.no_grad():
        after.router.gates["old"].weight.copy_(before.router.gates["old"].weight)
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            getattr(after.experts, name)[:3].copy_(getattr(before.experts, name))
    x = torch.randn(11, DIM)
    y_before, routing_before = before(x, "old")
    y_after, routing_after = after(x, "old")
    assert routing_before.dropped_slots > 0
    assert routing_after.dropped_slots == routing_before.dropped_slots
    assert torch.equal(y_after, y_before)


def test_bounded_layer_under_bf16_autocast():
    moe = _randomised_moe(0.5)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, routing = moe(x, "a")
    assert y.dtype == torch.bfloat16 and routing.dropped_slots > 0
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert moe.experts.fc1_weight.grad.dtype == torch.float32
