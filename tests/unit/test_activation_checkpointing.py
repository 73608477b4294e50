"""Per-block activation checkpointing (train.activation_checkpointing): the same gradients as the plain run
through the real training step (task losses, load-balance, z- and MI losses of the routing records), with
stochastic depth replayed, no statistic counted twice, and blocks actually rerun in the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from moevit.config.schema import AuxLossConfig
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.moe_vit import set_activation_checkpointing
from moevit.models.multitask import MultiTaskModel
from moevit.train.step import MultiTaskStep

TASKS = {"shapes": ("classification", 3), "regions": ("segmentation", 4)}
IMAGE_SIZE = 32
AUX = AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.1)
PRIOR = {"shapes": 0.5, "regions": 0.5}


class GradientEngine:
    """Stand-in for the DeepSpeed engine that keeps the gradients of one backward (no update)."""

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def __call__(self, task, batch):
        return self.module(task, batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def make_model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=list(TASKS), drop_path_rate=0.3)
    for _, router in backbone.routers():  # random gates: zero ones tie every expert
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5)
    heads = {task: build_head(kind, n, backbone, IMAGE_SIZE) for task, (kind, n) in TASKS.items()}
    return MultiTaskModel(backbone, heads)


def make_plan() -> StepPlan:
    generator = torch.Generator().manual_seed(1)
    images = {task: torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for task in TASKS}
    return StepPlan(
        0,
        (
            TaskBatch("shapes", {"images": images["shapes"], "labels": torch.tensor([0, 1, 2, 1])}),
            TaskBatch(
                "regions",
                {
                    "images": images["regions"],
                    "masks": torch.randint(0, 4, (4, IMAGE_SIZE, IMAGE_SIZE), generator=generator),
                },
            ),
        ),
    )


def run_step(checkpointing: bool):
    model = make_model()
    model.train()
    set_activation_checkpointing(model, checkpointing)
    step = MultiTaskStep(GradientEngine(model), list(TASKS), AUX, PRIOR, 1, torch.device("cpu"))
    calls = count_block_calls(model)
    torch.manual_seed(123)  # drop path draws from here, in the forward and again in the rerun
    result = step(make_plan(), dict.fromkeys(TASKS, 1.0))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, step, result, grads, calls


def count_block_calls(model: MultiTaskModel) -> list[int]:
    calls = [0] * len(model.backbone.blocks)
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_checkpointed_blocks_give_the_plain_gradients_and_statistics():
    _, plain_step, plain, plain_grads, plain_calls = run_step(checkpointing=False)
    _, ckpt_step, ckpt, ckpt_grads, ckpt_calls = run_step(checkpointing=True)
    # Checkpointing is on: every block ran again in the backward, once per task forward.
    assert plain_calls == [len(TASKS)] * len(plain_calls)
    assert ckpt_calls == [2 * len(TASKS)] * len(ckpt_calls)
    # The same objective, and the same gradient for every parameter, routers included (their gradient
    # comes through the routing records: aux losses and MI).
    assert ckpt.total == plain.total and ckpt.mutual_information == plain.mutual_information
    assert ckpt_grads.keys() == plain_grads.keys()
    gates = [name for name in plain_grads if ".router.gates." in name]
    assert gates and all(plain_grads[name].abs().sum() > 0 for name in gates)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Statistics taken from the records are counted once, not once more for the rerun.
    for layer, counts in plain.expert_counts.items():
        for task, count in counts.items():
            assert torch.equal(ckpt.expert_counts[layer][task], count), (layer, task)
    assert ckpt_step.task_expert_mass.state_dict() == plain_step.task_expert_mass.state_dict()


def test_checkpointing_is_off_in_evaluation_and_without_gradients():
    model = make_model()
    set_activation_checkpointing(model, True)
    reference = copy.deepcopy(model)
    set_activation_checkpointing(reference, False)
    calls = count_block_calls(model)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()
    reference.eval()
    out = model.backbone.forward_backbone(images, "shapes")
    torch.testing.assert_close(out.tokens, reference.backbone.forward_backbone(images, "shapes").tokens)
    model.train()
    with torch.no_grad():
        model.backbone.forward_backbone(images, "shapes")
    assert calls == [2] * len(calls)  # one call each, no checkpoint frames


def test_the_switch_reaches_every_backbone():
    model = make_model()
    assert not model.backbone.activation_checkpointing  # off unless the config asks
    assert set_activation_checkpointing(model, True) == 1
    assert model.backbone.activation_checkpointing


def test_the_memory_estimate_of_checkpointed_blocks_matches_what_autograd_keeps():
    """fp32 on CPU: with checkpointing, what stays between forward and backward is each block's input plus
    the ends (patch-embedding input, final norm input); the estimate's rerun term is one block's."""
    from moevit.train.activation_memory import backbone_bytes, saved_activation_bytes

    model = make_model()
    set_activation_checkpointing(model, True)
    backbone = model.backbone.train()
    images = torch.randn(2, 3, 64, 64)
    with saved_activation_bytes(model) as saved:
        out = backbone.forward_backbone(images, "shapes", ())
    out.tokens.sum().backward()
    estimate = backbone_bytes(backbone, (64, 64), "fp32", checkpointing=True)
    kept = 2 * (estimate["block inputs"] + estimate["ends"])
    assert kept == pytest.approx(sum(saved.values()), rel=0.15)
    plain = backbone_bytes(backbone, (64, 64), "fp32")
    assert estimate["block rerun"] < (plain["attention"] + plain["mlp"]) / 2  # one block of four
    assert sum(estimate.values()) < sum(plain.values())
