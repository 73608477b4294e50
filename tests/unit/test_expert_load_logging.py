"""Each MoE layer's busiest/mean expert load reaches metrics.jsonl at every logged step, from all ranks' counts."""

from __future__ import annotations

import json

import pytest
import torch
from local_engine import LocalEngine

from moevit.config.schema import AuxLossConfig
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.layers.router import Routing, busiest_over_mean
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.train import expert_load
from moevit.train import step as step_module
from moevit.train.logging import RunLogger
from moevit.train.step import MultiTaskStep

TASKS = {"shapes": 3, "textures": 4}


def make_model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=list(TASKS))
    return MultiTaskModel(
        backbone, {t: build_head("classification", n, backbone, 32) for t, n in TASKS.items()}
    )


def make_plan(seed: int) -> StepPlan:
    generator = torch.Generator().manual_seed(seed)
    return StepPlan(
        0,
        tuple(
            TaskBatch(
                task,
                {
                    "images": torch.randn(4, 3, 32, 32, generator=generator),
                    "labels": torch.randint(0, n, (4,), generator=generator),
                    "keys": [f"{task}/{i}" for i in range(4)],
                },
            )
            for task, n in TASKS.items()
        ),
    )


def test_every_logged_step_carries_each_layers_load_per_task(tmp_path):
    model = make_model()
    reference = make_model()
    aux = AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.0)
    step = MultiTaskStep(
        LocalEngine(model), list(TASKS), aux, {"shapes": 0.5, "textures": 0.5}, 1, torch.device("cpu")
    )
    logger = RunLogger(tmp_path / "metrics.jsonl", tmp_path / "tb", 2, 0, 1, True)
    expected = {}
    for number in (1, 2):
        plan = make_plan(number)
        with torch.no_grad():  # what step `number` routes: the reference follows the trained weights
            reference.load_state_dict(model.state_dict())
            for task, batch in plan:
                routing = reference(task, batch).routing
                expected[number, task] = {
                    f"expert_load/{k}": r.busiest_over_mean() for k, r in routing.items()
                }
        logger.log_step(number, step(plan, {t: 1.0 for t in TASKS}), 0.1, 1.0, {t: 0 for t in TASKS})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["task"] is None:
            continue
        loads = {key: value for key, value in record.items() if key.startswith("expert_load/")}
        assert set(loads) == {"expert_load/blocks.1.mlp", "expert_load/blocks.3.mlp"}
        assert loads == pytest.approx(expected[record["step"], record["task"]])
        assert all(value >= 1.0 for value in loads.values())
    assert {(r["step"], r["task"]) for r in records} == {(s, t) for s in (1, 2) for t in (*TASKS, None)}


def test_load_is_computed_from_the_counts_summed_over_ranks():
    def routing(counts):
        counts = torch.tensor(counts)
        return Routing(
            "a",
            torch.zeros(1, 1, dtype=torch.int64),
            torch.ones(1, 1),
            torch.ones(4),
            counts,
            torch.zeros(()),
        )

    routing_by_task = {"a": {"blocks.1.mlp": routing([6, 0, 0, 0]), "blocks.3.mlp": routing([1, 1, 1, 1])}}
    local = expert_load.local_counts(routing_by_task, torch.device("cpu"))
    assert local.tolist() == [6, 0, 0, 0, 1, 1, 1, 1]
    other_rank = torch.tensor(
        [0, 6, 0, 0, 0, 1, 2, 3]
    )  # the other rank's counts of both layers, concatenated
    ratios = expert_load.load_ratios(routing_by_task, (local + other_rank).tolist())
    assert ratios == {
        "a": {
            "expert_load/blocks.1.mlp": busiest_over_mean(torch.tensor([6, 6, 0, 0])),  # 2.0, locally 4.0
            "expert_load/blocks.3.mlp": busiest_over_mean(torch.tensor([1, 2, 3, 4])),
        }
    }


def test_the_loads_ride_on_the_steps_one_all_reduce(monkeypatch):
    """The counts travel in the all-reduce of the logged scalars: one collective and one host sync per
    round, not one more per statistic."""
    reduced = []

    def recording_all_reduce(tensor):
        reduced.append(tensor.clone())
        return tensor

    monkeypatch.setattr(step_module, "all_reduce_sum", recording_all_reduce)
    step = MultiTaskStep(
        LocalEngine(make_model()),
        list(TASKS),
        AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.0),
        {"shapes": 0.5, "textures": 0.5},
        1,
        torch.device("cpu"),
    )
    result = step(make_plan(1), {t: 1.0 for t in TASKS})
    assert len(reduced) == 1
    tokens = 4 * (32 // 8) ** 2 + 4  # 4 images of 16 patches and a class token each (moevit_debug: patch 8)
    layers = len(make_model().backbone.mlp_layers())
    experts_total = reduced[0][-len(TASKS) * layers * 4 :]  # moevit_debug: 4 experts per layer
    assert experts_total.sum().item() == len(TASKS) * layers * tokens * 2  # top-2: two slots per token
    assert all(key in result.task_losses[t] for t in TASKS for key in ("expert_load/blocks.1.mlp",))
