"""MI across ranks (moevit.train.step), checked with real processes: a step on 2 gloo ranks, each with half
of every task's batch, updates the weights exactly as one process does on the whole batch, including the
mutual-information loss whose statistics are summed across ranks. (Load balance is left out: it is a
per-rank loss by design, as in DeepSpeed and Switch.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moevit.config.schema import AuxLossConfig
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.train.step import MultiTaskStep

pytestmark = pytest.mark.distributed

TASKS = {"shapes": 3, "textures": 4}
GLOBAL_BATCH = 4
AUX = AuxLossConfig(load_balance=0.0, z_loss=0.001, mutual_information=0.5)
PRIOR = {"shapes": 0.5, "textures": 0.5}
WORLD_SIZE = 2
TIMEOUT_S = 120


class AveragingEngine:
    """Stand-in for the DeepSpeed engine: averages gradients over the ranks, then plain SGD."""

    def __init__(self, model, world_size):
        self.module, self.world_size = model, world_size
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def __call__(self, task, batch):
        return self.module(task, batch)

    def backward(self, loss):
        loss.backward()
        if self.world_size > 1:
            for parameter in self.module.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.world_size

    def step(self):
        self.optimizer.step()


def make_model():
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=list(TASKS))
    heads = {task: build_head("classification", n, backbone, 32) for task, n in TASKS.items()}
    # Gates start at zero: uniform routing, where the MI loss is stationary. Random gates give it a gradient.
    for _, router in backbone.routers():
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5)
    return MultiTaskModel(backbone, heads)


def global_batches():
    generator = torch.Generator().manual_seed(3)
    return {
        task: (
            torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
            torch.randint(0, n, (GLOBAL_BATCH,), generator=generator),
        )
        for task, n in TASKS.items()
    }


def run_step(rank: int, world_size: int):
    share = GLOBAL_BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    plan = StepPlan(
        0,
        tuple(
            TaskBatch(task, {"images": images[rows], "labels": labels[rows]})
            for task, (images, labels) in global_batches().items()
        ),
    )
    engine = AveragingEngine(make_model(), world_size)
    step = MultiTaskStep(engine, list(TASKS), AUX, PRIOR, world_size, torch.device("cpu"))
    result = step(plan, dict.fromkeys(TASKS, 1.0))
    return {name: p.detach() for name, p in engine.module.named_parameters()}, result


def step_worker() -> tuple[dict, float]:
    """One rank (run by run_workers in a fresh process with torchrun's variables)."""
    dist.init_process_group("gloo")
    try:
        state, result = run_step(dist.get_rank(), dist.get_world_size())
        return state, result.mutual_information
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_global_batch(run_workers):
    ranks = run_workers(step_worker, WORLD_SIZE, TIMEOUT_S)
    reference_state, reference = run_step(rank=0, world_size=1)
    for state, mutual_information in ranks:
        assert abs(mutual_information - reference.mutual_information) < 1e-6
        for name, value in reference_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def run_round_robin(rank: int, world_size: int):
    """Two one-task steps (shapes, then textures), each rank holding its share of the global batch."""
    share = GLOBAL_BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    engine = AveragingEngine(make_model(), world_size)
    step = MultiTaskStep(engine, list(TASKS), AUX, PRIOR, world_size, torch.device("cpu"))
    results = []
    for index, (task, (images, labels)) in enumerate(global_batches().items()):
        plan = StepPlan(index, (TaskBatch(task, {"images": images[rows], "labels": labels[rows]}),))
        results.append(step(plan, dict.fromkeys(TASKS, 1.0)).mutual_information)
    state = {name: p.detach() for name, p in engine.module.named_parameters()}
    return state, results, step.task_expert_mass.state_dict()


def round_robin_worker():
    dist.init_process_group("gloo")
    try:
        return run_round_robin(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def test_running_task_expert_estimate_is_the_all_rank_one(run_workers):
    # The second step's MI takes shapes' row from the running estimate: on 2 ranks that row must be the
    # all-rank sum (identical on both ranks), so the update equals one process on the global batches.
    ranks = run_workers(round_robin_worker, WORLD_SIZE, TIMEOUT_S)
    reference_state, reference_mi, reference_estimate = run_round_robin(rank=0, world_size=1)
    assert reference_mi[0] == pytest.approx(0.0, abs=1e-7) and reference_mi[1] < -1e-4
    for state, mutual_information, estimate in ranks:
        assert mutual_information == pytest.approx(reference_mi, abs=1e-6)
        assert estimate["seen"] == reference_estimate["seen"] == [True, True]
        for got, expected in zip(estimate["rows"], reference_estimate["rows"], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
        for name, value in reference_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
