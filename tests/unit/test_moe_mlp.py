"""MoE MLP routing, dispatch and combine against a naive per-token reference."""

import torch
import torch.nn.functional as F

from moevit.layers import MoEMlp, combine, dispatch, plan_dispatch


def _randomised_moe(num_experts=6, top_k=2, dim=16, hidden=24, tasks=("a", "b")):
    torch.manual_seed(0)
    moe = MoEMlp(dim, hidden, num_experts, top_k, tasks)
    for gate in moe.router.gates.values():  # zero gates tie every expert; make routing non-trivial
        torch.nn.init.normal_(gate.weight, std=1.0)
    for bias in (moe.experts.fc1_bias, moe.experts.fc2_bias):
        torch.nn.init.normal_(bias, std=0.1)
    return moe


def _expert(moe, e, x_D):
    experts = moe.experts
    h = F.gelu(x_D @ experts.fc1_weight[e].T + experts.fc1_bias[e])
    return h @ experts.fc2_weight[e].T + experts.fc2_bias[e]


def test_output_is_weighted_sum_of_each_tokens_top_k_experts():
    moe = _randomised_moe()
    x = torch.randn(3, 5, 16)
    y, routing = moe(x, "a")
    x_TD, y_TD = x.reshape(-1, 16), y.reshape(-1, 16)
    logits = x_TD @ moe.router.gates["a"].weight.T
    for t in range(x_TD.shape[0]):
        probs = logits[t].softmax(-1)
        top_p, top_e = probs.topk(2)
        weights = top_p / top_p.sum()
        expected = sum(w * _expert(moe, e, x_TD[t]) for w, e in zip(weights, top_e.tolist()))
        torch.testing.assert_close(y_TD[t], expected, atol=1e-5, rtol=1e-5)
        assert set(routing.expert_idx_TK[t].tolist()) == set(top_e.tolist())


def test_gate_weights_renormalised_and_unselected_expert_removal_leaves_output_unchanged():
    moe = _randomised_moe(num_experts=6, top_k=2)
    x = torch.randn(40, 16)
    y, routing = moe(x, "b")
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(40))
    # Remove one expert (slice experts and gate rows, as the pruner does): tokens that did not
    # select it must keep exactly their output.
    removed = 3
    keep = [e for e in range(6) if e != removed]
    pruned = MoEMlp(16, 24, 5, 2, ("b",))
    with torch.no_grad():
        pruned.router.gates["b"].weight.copy_(moe.router.gates["b"].weight[keep])
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            getattr(pruned.experts, name).copy_(getattr(moe.experts, name)[keep])
    y_pruned, _ = pruned(x, "b")
    untouched = ~(routing.expert_idx_TK == removed).any(-1)
    assert untouched.sum() > 10
    torch.testing.assert_close(y_pruned[untouched], y[untouched], atol=1e-6, rtol=1e-6)


def test_dispatch_combine_roundtrip_is_identity_for_identity_experts():
    expert_idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    plan = plan_dispatch(expert_idx, num_experts=3)
    assert plan.counts_E.tolist() == [2, 3, 3]
    x = torch.randn(4, 8)
    rows = dispatch(x, plan)
    # Rows are grouped by expert, tokens in order within an expert (stable sort).
    assert plan.token_of_row_S.tolist() == [0, 2, 1, 2, 3, 0, 1, 3]
    weights = torch.full((4, 2), 0.5)
    torch.testing.assert_close(combine(rows, weights, plan), x)


def test_router_counts_every_routed_slot():
    moe = _randomised_moe()
    x = torch.randn(10, 16)
    _, routing = moe(x, "a")
    assert routing.counts_E.sum() == 10 * 2
    assert torch.equal(routing.counts_E, torch.bincount(routing.expert_idx_TK.flatten(), minlength=6))


def test_task_loss_gives_other_tasks_router_no_gradient():
    moe = _randomised_moe()
    y, routing = moe(torch.randn(12, 16), "a")
    (y.square().sum() + routing.z_loss + routing.probs_sum_E.sum()).backward()
    assert moe.router.gates["a"].weight.grad.abs().sum() > 0
    assert moe.router.gates["b"].weight.grad is None


def test_forced_balanced_routing_reaches_every_expert():
    moe = _randomised_moe(num_experts=5, top_k=2)
    moe.router.force_balanced = True
    y, routing = moe(torch.randn(10, 16), "a")
    assert (routing.counts_E == 4).all()
    y.sum().backward()
    assert (moe.experts.fc1_weight.grad.flatten(1).abs().sum(1) > 0).all()
    assert moe.router.gates["a"].weight.grad.abs().sum() > 0


def test_router_runs_in_fp32_under_bf16_autocast():
    moe = _randomised_moe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, routing = moe(torch.randn(8, 16), "a")
    assert routing.weights_TK.dtype == torch.float32
    assert routing.probs_sum_E.dtype == torch.float32
