"""The running task-expert estimate that lets the MI loss span steps (moevit.train.task_expert_estimate)."""

import json

import pytest
import torch

from moevit.layers import mutual_information_loss
from moevit.train.task_expert_estimate import RunningTaskRows

TASKS = ["cls", "det", "seg"]


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_first_row_is_taken_as_is_then_decays_only_when_the_task_trains():
    estimate = RunningTaskRows(TASKS, decay=0.75)
    estimate.update([rows([4.0, 0.0], [0.0, 0.0], [0.0, 0.0])], trained={"cls"})
    assert estimate.rows_LTE[0].tolist() == [[4.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert estimate.seen_T.tolist() == [True, False, False]

    # det trains for the first time (taken as is); cls does not train: its row must not move.
    estimate.update([rows([100.0, 100.0], [1.0, 3.0], [0.0, 0.0])], trained={"det"})
    assert estimate.rows_LTE[0].tolist() == [[4.0, 0.0], [1.0, 3.0], [0.0, 0.0]]

    estimate.update([rows([0.0, 8.0], [0.0, 0.0], [0.0, 0.0])], trained={"cls"})
    assert estimate.rows_LTE[0].tolist() == [[3.0, 2.0], [1.0, 3.0], [0.0, 0.0]]  # 0.75 old + 0.25 new


def test_complete_fills_only_the_rows_of_tasks_that_did_not_train_and_detaches_them():
    estimate = RunningTaskRows(TASKS, decay=0.5)
    estimate.update([rows([1.0, 2.0], [3.0, 4.0], [0.0, 0.0])], trained={"cls", "det"})
    current = rows([0.0, 0.0], [7.0, 8.0], [0.0, 0.0]).requires_grad_()
    (completed,) = estimate.complete([current * 1.0], trained={"det"})
    # cls: its running row; det: this step's row; seg never trained: stays zero (left out of the MI).
    assert completed.tolist() == [[1.0, 2.0], [7.0, 8.0], [0.0, 0.0]]
    completed.sum().backward()
    assert current.grad.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # cls's stand-in is a constant


def test_a_step_that_trains_every_task_gets_its_own_matrices_back():
    estimate = RunningTaskRows(TASKS, decay=0.5)
    estimate.update([rows([1.0, 2.0], [3.0, 4.0], [5.0, 6.0])], trained=set(TASKS))
    current = [rows([9.0, 9.0], [9.0, 9.0], [9.0, 9.0])]
    assert estimate.complete(current, trained=set(TASKS))[0] is current[0]


def test_gradient_reaching_a_trained_task_equals_the_full_matrix_mi_gradient():
    # Hand-built: det's row is a softmax of its logits (its router); cls's row came from an earlier step.
    cls_row = torch.tensor([6.0, 1.0, 1.0])
    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    prior = torch.tensor([0.5, 0.5])

    estimate = RunningTaskRows(["cls", "det"], decay=0.5)
    estimate.update([torch.stack([cls_row, torch.zeros(3)])], trained={"cls"})
    step_matrix = torch.stack([torch.zeros(3), 8 * logits.softmax(0)])
    (completed,) = estimate.complete([step_matrix], trained={"det"})
    (through_estimate,) = torch.autograd.grad(mutual_information_loss(completed, prior), logits)

    full_matrix = torch.stack([cls_row, 8 * logits.softmax(0)])
    (expected,) = torch.autograd.grad(mutual_information_loss(full_matrix, prior), logits)
    torch.testing.assert_close(through_estimate, expected, rtol=0, atol=0)
    assert expected.abs().max() > 1e-3  # the full matrix does push det's router

    # Without the estimate det's row is alone, I(T; E) = 0 and its router gets nothing.
    step_matrix = torch.stack([torch.zeros(3), 8 * logits.softmax(0)])
    (alone,) = torch.autograd.grad(mutual_information_loss(step_matrix, prior), logits)
    assert alone.abs().max() < 1e-7


def test_state_round_trips_exactly_through_json():
    estimate = RunningTaskRows(TASKS, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    for trained in ({"cls"}, {"det", "seg"}, {"cls"}):
        matrices = [torch.rand(3, 4, generator=generator) * 100, torch.rand(3, 2, generator=generator)]
        estimate.update(matrices, trained)

    restored = RunningTaskRows(TASKS, decay=0.9)
    restored.load_state_dict(json.loads(json.dumps(estimate.state_dict())))
    assert torch.equal(restored.seen_T, estimate.seen_T)
    for a, b in zip(restored.rows_LTE, estimate.rows_LTE, strict=True):
        assert torch.equal(a, b)


def test_state_of_other_tasks_is_refused():
    estimate = RunningTaskRows(["cls", "det"], decay=0.5)
    with pytest.raises(ValueError, match="covers tasks"):
        estimate.load_state_dict(RunningTaskRows(TASKS, decay=0.5).state_dict())


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        RunningTaskRows(TASKS, decay)
