"""Slots dropped by the expert capacity bound: counted per layer by the step, written to metrics.jsonl."""

import json

import pytest
import torch

from moevit.config.schema import AuxLossConfig
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.train.logging import RunLogger
from moevit.train.step import MultiTaskStep, StepResult

BATCH = 3


class _SgdEngine:
    """The engine interface MultiTaskStep drives, single process."""

    def __init__(self, model):
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def __call__(self, task, batch):
        return self.module(task, batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def _step_result(capacity_factor):
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=["a"], capacity_factor=capacity_factor)
    for layer in backbone.mlp_layers().values():  # zero gates tie every token to the same experts
        torch.nn.init.normal_(layer.router.gates["a"].weight)
    model = MultiTaskModel(backbone, {"a": build_head("classification", 3, backbone, 32)})
    step = MultiTaskStep(_SgdEngine(model), ["a"], AuxLossConfig(), {"a": 1.0}, 1, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    batch = {
        "images": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "labels": torch.randint(0, 3, (BATCH,), generator=generator),
        "keys": [f"a/{i}" for i in range(BATCH)],
    }
    return step(StepPlan(0, (TaskBatch("a", batch),)), {"a": 1.0}), backbone


def test_step_counts_the_dropped_slots_of_every_bounded_layer():
    result, backbone = _step_result(capacity_factor=0.5)
    tokens = BATCH * ((32 // backbone.patch_size) ** 2 + backbone.num_prefix_tokens)
    assert list(result.dropped_slots) == list(backbone.mlp_layers())
    for dropped, routed in result.dropped_slots.values():
        assert routed == tokens * 2  # top-2
        # Factor 0.5: the experts together take at most half the slots (plus the ceiling's rounding).
        assert dropped >= routed // 2 - backbone.mlp_layers()["blocks.1.mlp"].num_experts


def test_a_dropless_model_reports_no_drops():
    result, _ = _step_result(capacity_factor=None)
    assert result.dropped_slots == {}


def test_metrics_jsonl_carries_the_dropped_count_and_per_layer_fraction(tmp_path):
    logger = RunLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", 10, 0, 2, True)
    for step, dropped in ((1, 10), (2, 30)):
        result = StepResult(
            task_losses={"a": {"loss": 1.0, "weight": 1.0}},
            mutual_information=None,
            total=1.0,
            images=4,
            dropped_slots={"blocks.1.mlp": (dropped, 100), "blocks.3.mlp": (0, 100)},
        )
        logger.log_step(step, result, lr=0.1, seconds=1.0, skipped={"a": 0})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_record = next(line for line in lines if line["task"] is None)
    assert step_record["dropped_slots"] == 20  # mean per step over the two steps
    assert step_record["dropped_fraction/blocks.1.mlp"] == pytest.approx(0.2)
    assert step_record["dropped_fraction/blocks.3.mlp"] == 0.0
