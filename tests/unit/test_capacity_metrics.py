"""Slots dropped by the expert capacity bound: counted per layer by the step, written to metrics.jsonl."""

import json

import pytest
import torch
from local_engine import LocalEngine

from moevit.config.schema import AuxLossConfig
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.train.logging import RunLogger
from moevit.train.step import MultiTaskStep

BATCH = 3


def _step_result(capacity_factor):
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=["a"], capacity_factor=capacity_factor)
    for layer in backbone.mlp_layers().values():  # zero gates tie every token to the same experts
        torch.nn.init.normal_(layer.router.gates["a"].weight)
    model = MultiTaskModel(backbone, {"a": build_head("classification", 3, backbone, 32)})
    step = MultiTaskStep(
        LocalEngine(model, lr=0.01), ["a"], AuxLossConfig(), {"a": 1.0}, 1, torch.device("cpu")
    )
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
    values = result.task_losses["a"]
    fractions = {key: value for key, value in values.items() if key.startswith("dropped_fraction/")}
    assert sorted(fractions) == sorted(f"dropped_fraction/{layer}" for layer in backbone.mlp_layers())
    dropped = round(sum(fractions.values()) * tokens * 2)  # top-2: 2 slots per token
    assert values["dropped_slots"] == dropped > 0
    for layer, module in backbone.mlp_layers().items():
        # Factor 0.5: kept slots <= E * ceil(0.5 * S / E) < S / 2 + E, whatever the routing.
        assert fractions[f"dropped_fraction/{layer}"] > 0.5 - module.num_experts / (tokens * 2)


def test_a_dropless_model_reports_no_drops():
    result, _ = _step_result(capacity_factor=None)
    assert not any(key.startswith("dropped") for key in result.task_losses["a"])


def test_metrics_jsonl_carries_the_dropped_count_and_per_layer_fraction(tmp_path):
    result, backbone = _step_result(capacity_factor=0.5)
    logger = RunLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", 10, 0, 1, True)
    logger.log_step(1, result, lr=0.1, seconds=1.0, skipped={"a": 0})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    record = next(line for line in lines if line["task"] == "a")
    assert record["dropped_slots"] == result.task_losses["a"]["dropped_slots"] > 0
    for layer in backbone.mlp_layers():
        key = f"dropped_fraction/{layer}"
        assert record[key] == pytest.approx(result.task_losses["a"][key])
