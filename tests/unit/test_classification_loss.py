"""The classification head's loss: hard labels, and the soft targets Mixup and label smoothing make (equal
to timm's SoftTargetCrossEntropy); smoothing is never a head option, so it cannot apply twice."""

from __future__ import annotations

import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from moevit.heads.classification import ClassificationHead

NUM_CLASSES = 7


def _head() -> ClassificationHead:
    return ClassificationHead(embed_dim=16, num_classes=NUM_CLASSES)


def test_soft_target_loss_equals_timms():
    logits = torch.randn(6, NUM_CLASSES, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.softmax(torch.randn(6, NUM_CLASSES, generator=torch.Generator().manual_seed(1)), dim=1)
    expected = SoftTargetCrossEntropy()(logits, targets)
    assert torch.allclose(_head().loss(logits, targets), expected, atol=1e-6)


def test_mixed_targets_give_timms_loss_and_gradient():
    logits = torch.randn(4, NUM_CLASSES, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2])
    targets = mixup_target(labels, NUM_CLASSES, lam=0.7, smoothing=0.1)
    ours = _head().loss(logits, targets)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = SoftTargetCrossEntropy()(logits, targets)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(ours_grad, theirs_grad, atol=1e-6)


def test_smoothed_one_hot_targets_equal_cross_entropy_with_label_smoothing():
    # What the training collate gives with smoothing and no mixing: the same loss as torch's smoothing.
    logits = torch.randn(5, NUM_CLASSES)
    labels = torch.tensor([1, 0, 6, 6, 3])
    smoothed = _head().loss(logits, mixup_target(labels, NUM_CLASSES, 1.0, 0.2))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    assert torch.allclose(smoothed, expected, atol=1e-6)


def test_hard_labels_are_plain_cross_entropy():
    logits = torch.randn(3, NUM_CLASSES)
    labels = torch.tensor([2, 5, 0])
    assert torch.equal(_head().loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(2, NUM_CLASSES)
    targets = mixup_target(torch.tensor([1, 2]), NUM_CLASSES, 0.6, 0.0)
    loss = _head().loss(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, SoftTargetCrossEntropy()(logits.bfloat16().float(), targets))


@pytest.mark.parametrize(
    "targets, message",
    [
        (torch.full((3, NUM_CLASSES + 1), 1 / (NUM_CLASSES + 1)), r"shape \(3, 7\), got \(3, 8\)"),
        (torch.full((2, NUM_CLASSES), 1 / NUM_CLASSES), r"shape \(3, 7\), got \(2, 7\)"),
        (torch.ones(3, NUM_CLASSES), "summing to 1"),
    ],
)
def test_malformed_soft_targets_are_refused(targets, message):
    with pytest.raises(ValueError, match=message):
        _head().loss(torch.randn(3, NUM_CLASSES), targets)


def test_label_smoothing_is_not_a_head_option():
    with pytest.raises(TypeError, match="label_smoothing"):
        ClassificationHead(embed_dim=16, num_classes=NUM_CLASSES, label_smoothing=0.1)
