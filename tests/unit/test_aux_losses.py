"""Auxiliary losses against hand-worked examples."""

import math

import pytest
import torch

from moevit.layers import (
    load_balance_loss,
    mean_mutual_information_loss,
    mutual_information_loss,
    router_z_loss,
    task_expert_matrices,
)
from moevit.layers.router import Routing


def _routing(probs_sum, counts, tokens, task="a", z=0.0):
    k = sum(counts) // tokens
    return Routing(
        task=task,
        expert_idx_TK=torch.zeros(tokens, k, dtype=torch.long),
        weights_TK=torch.full((tokens, k), 1.0 / k),
        probs_sum_E=torch.tensor(probs_sum),
        counts_E=torch.tensor(counts),
        z_loss=torch.tensor(z),
    )


def test_mi_of_perfectly_specialised_tasks_is_log_two():
    # Two tasks, two experts, each task uses only its own expert:
    # P(t,e) = diag(.5, .5), P(t) = P(e) = .5 -> MI = 2 * .5 * log(.5 / .25) = log 2.
    A = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert mutual_information_loss(A).item() == pytest.approx(-math.log(2), abs=1e-6)


def test_mi_is_zero_when_tasks_route_alike():
    A = torch.tensor([[1.0, 3.0], [2.0, 6.0]])  # rows proportional: routing independent of task
    assert mutual_information_loss(A).item() == pytest.approx(0.0, abs=1e-6)


def test_mi_hand_computed_asymmetric_example():
    # A = [[3, 1], [1, 3]] / 8 -> P = [[3/8, 1/8], [1/8, 3/8]], all marginals 1/2.
    # MI = 2 * (3/8 log(3/8 / 1/4) + 1/8 log(1/8 / 1/4)) = 3/4 log 1.5 + 1/4 log 0.5
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    A = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    assert mutual_information_loss(A).item() == pytest.approx(-expected, abs=1e-6)


def test_task_prior_replaces_batch_token_counts():
    # Task 0 happened to have 9x the tokens of task 1 on this rank, but both are sampled equally:
    # with the prior the result equals the balanced case.
    A_skewed = torch.tensor([[27.0, 9.0], [1.0, 3.0]])
    A_balanced = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    prior = torch.tensor([0.5, 0.5])
    assert mutual_information_loss(A_skewed, prior).item() == pytest.approx(
        mutual_information_loss(A_balanced).item(), abs=1e-6
    )
    assert mutual_information_loss(A_skewed).item() != pytest.approx(
        mutual_information_loss(A_balanced).item()
    )


def test_mi_ignores_tasks_without_tokens_and_has_gradient():
    A = torch.tensor([[3.0, 1.0], [0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    loss = mutual_information_loss(A, torch.tensor([0.4, 0.2, 0.4]))
    loss.backward()
    assert torch.isfinite(A.grad).all()
    assert loss.item() == pytest.approx(
        mutual_information_loss(torch.tensor([[3.0, 1.0], [1.0, 3.0]])).item()
    )


def test_load_balance_is_one_when_uniform_and_larger_when_skewed():
    uniform = _routing([2.0, 2.0, 2.0, 2.0], [2, 2, 2, 2], tokens=8)  # top-1, 8 tokens, 4 experts
    assert load_balance_loss([uniform]).item() == pytest.approx(1.0)
    # All 8 tokens on expert 0 with mean prob 1: E * f_0 * P_0 = 4 * 1 * 1 = 4.
    skewed = _routing([8.0, 0.0, 0.0, 0.0], [8, 0, 0, 0], tokens=8)
    assert load_balance_loss([skewed]).item() == pytest.approx(4.0)
    assert load_balance_loss([uniform, skewed]).item() == pytest.approx(2.5)


def test_z_loss_mean_over_layers():
    routings = [_routing([1.0], [1], 1, z=2.0), _routing([1.0], [1], 1, z=4.0)]
    assert router_z_loss(routings).item() == pytest.approx(3.0)


def test_task_expert_matrices_fill_absent_tasks_with_zero_rows():
    a = [_routing([1.0, 2.0], [1, 2], 3), _routing([3.0, 0.0], [3, 0], 3)]
    b = [_routing([0.5, 0.5], [1, 0], 1, task="b"), _routing([0.0, 1.0], [0, 1], 1, task="b")]
    matrices = task_expert_matrices({"a": a, "c": b}, tasks=["a", "b", "c"])
    assert len(matrices) == 2
    torch.testing.assert_close(matrices[0], torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.5, 0.5]]))
    expected = (mutual_information_loss(matrices[0]) + mutual_information_loss(matrices[1])) / 2
    assert mean_mutual_information_loss(matrices).item() == pytest.approx(expected.item())
