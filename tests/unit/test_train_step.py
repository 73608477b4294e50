"""One training step on a stand-in engine: the objective it optimises, what it reports, what it updates."""

import copy

import pytest
import torch
from local_engine import LocalEngine

from moevit.config.schema import AuxLossConfig
from moevit.data.collate import move_batch
from moevit.data.multitask import StepPlan, TaskBatch
from moevit.heads import build_head
from moevit.layers import load_balance_loss, mean_mutual_information_loss, router_z_loss, task_expert_matrices
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.train.step import MultiTaskStep

NUM_CLASSES = {"shapes": 3, "textures": 4}
BATCH_SIZES = {"shapes": 4, "textures": 2}


def make_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    backbone = create_model("moevit_debug", tasks=list(NUM_CLASSES))
    heads = {task: build_head("classification", n, backbone, 32) for task, n in NUM_CLASSES.items()}
    return MultiTaskModel(backbone, heads)


def make_plan(tasks=tuple(NUM_CLASSES), seed: int = 1) -> StepPlan:
    generator = torch.Generator().manual_seed(seed)
    batches = tuple(
        TaskBatch(
            task,
            {
                "images": torch.randn(BATCH_SIZES[task], 3, 32, 32, generator=generator),
                "labels": torch.randint(0, NUM_CLASSES[task], (BATCH_SIZES[task],), generator=generator),
                "keys": [f"{task}/{i}" for i in range(BATCH_SIZES[task])],
            },
        )
        for task in tasks
    )
    return StepPlan(0, batches)


def make_step(engine, aux=None, prior=None, world_size=1):
    return MultiTaskStep(
        engine,
        list(NUM_CLASSES),
        aux or AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.1),
        prior or {"shapes": 2 / 3, "textures": 1 / 3},
        world_size,
        torch.device("cpu"),
    )


def test_step_reports_the_objective_it_optimises():
    weights = {"shapes": 1.0, "textures": 0.5}
    aux = AuxLossConfig(load_balance=0.01, z_loss=0.001, mutual_information=0.1)
    prior = {"shapes": 2 / 3, "textures": 1 / 3}
    plan = make_plan()
    reference = make_model()
    expected = torch.zeros(())
    routings = {}
    for task, batch in plan:
        out = reference(task, batch)
        layers = list(out.routing.values())
        expected += weights[task] * out.losses["loss"]
        expected += aux.load_balance * load_balance_loss(layers) + aux.z_loss * router_z_loss(layers)
        routings[task] = layers
    prior_T = torch.tensor([prior[t] for t in NUM_CLASSES])
    mutual_information = mean_mutual_information_loss(
        task_expert_matrices(routings, list(NUM_CLASSES)), prior_T
    )
    expected += aux.mutual_information * mutual_information

    engine = LocalEngine(make_model())
    result = make_step(engine, aux, prior)(plan, weights)
    assert engine.backward_calls == 1  # one backward over the sum of the step's losses
    assert result.total == pytest.approx(expected.item(), rel=1e-6)
    assert result.mutual_information == pytest.approx(mutual_information.item(), rel=1e-6)
    assert result.images == sum(BATCH_SIZES.values())
    assert set(result.task_losses) == set(NUM_CLASSES)
    assert result.task_losses["textures"]["weight"] == 0.5
    assert {"loss", "load_balance", "z_loss", "weight"} <= set(result.task_losses["shapes"])


def test_step_updates_every_router_it_routed_with():
    engine = LocalEngine(make_model())
    before = copy.deepcopy(engine.module.state_dict())
    make_step(engine)(make_plan(), {"shapes": 1.0, "textures": 1.0})
    after = engine.module.state_dict()
    gates = [name for name in after if ".router.gates." in name and name.endswith("weight")]
    assert gates and all(not torch.equal(before[name], after[name]) for name in gates)


def test_expert_counts_cover_every_routed_slot():
    engine = LocalEngine(make_model())
    result = make_step(engine)(make_plan(), {"shapes": 1.0, "textures": 1.0})
    backbone = engine.module.backbone
    tokens_per_image = (32 // backbone.patch_size) ** 2 + backbone.num_prefix_tokens
    assert list(result.expert_counts) == [name for name, _ in backbone.routed_layers()]
    for by_task in result.expert_counts.values():
        for task, counts_E in by_task.items():
            assert counts_E.sum().item() == BATCH_SIZES[task] * tokens_per_image * 2  # top-2


def test_one_task_step_has_no_mutual_information_to_gain():
    # MI needs two tasks' rows; the first step trains one task and no other task has a row yet.
    engine = LocalEngine(make_model())
    result = make_step(engine)(make_plan(tasks=("textures",)), {"shapes": 1.0, "textures": 1.0})
    assert list(result.task_losses) == ["textures"]
    assert result.mutual_information == pytest.approx(0.0, abs=1e-6)


class GradientEngine(LocalEngine):
    """Keeps the gradients of each backward and never updates, so a reference can recompute them."""

    def backward(self, loss):
        super().backward(loss)
        self.gradients = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}

    def step(self):
        self.optimizer.zero_grad()


def test_one_task_step_gets_the_full_mi_gradient_from_the_other_tasks_earlier_rows():
    # Round-robin: step 1 trains shapes, step 2 textures. Step 2's MI takes shapes' row from step 1,
    # detached, so textures' routers get the gradient of MI over the full task-expert matrix.
    aux = AuxLossConfig(load_balance=0.0, z_loss=0.0, mutual_information=0.1)
    prior = {"shapes": 0.5, "textures": 0.5}
    weights = {"shapes": 1.0, "textures": 1.0}
    model = make_model()
    for _, router in model.backbone.routers():  # zero gates route uniformly: MI is stationary there
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5, generator=torch.Generator().manual_seed(4))
    engine = GradientEngine(copy.deepcopy(model))
    step = make_step(engine, aux, prior)
    step(make_plan(tasks=("shapes",)), weights)
    shapes_rows = [rows_TE[0] for rows_TE in step.task_expert_mass.rows_LTE]
    textures_plan = make_plan(tasks=("textures",), seed=2)
    result = step(textures_plan, weights)
    assert result.mutual_information < -1e-4  # I(T; E) > 0 from the second step on

    ((task, batch),) = textures_plan
    out = model(task, batch)
    step_rows = task_expert_matrices({task: list(out.routing.values())}, list(NUM_CLASSES))
    full = [torch.stack([shapes_row, rows_TE[1]]) for shapes_row, rows_TE in zip(shapes_rows, step_rows)]
    mutual_information = mean_mutual_information_loss(full, torch.tensor([0.5, 0.5]))
    assert result.mutual_information == pytest.approx(mutual_information.item(), rel=1e-5)
    (out.losses["loss"] + aux.mutual_information * mutual_information).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert expected.keys() == engine.gradients.keys()
    textures_gates = [n for n in expected if ".router.gates.textures." in n]
    assert textures_gates
    for name, gradient in expected.items():
        torch.testing.assert_close(engine.gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_mutual_information_off_is_not_computed():
    engine = LocalEngine(make_model())
    aux = AuxLossConfig(load_balance=0.0, z_loss=0.0, mutual_information=0.0)
    result = make_step(engine, aux)(make_plan(), {"shapes": 1.0, "textures": 1.0})
    assert result.mutual_information is None
    assert result.total == pytest.approx(
        result.task_losses["shapes"]["loss"] + result.task_losses["textures"]["loss"], rel=1e-6
    )


def test_mutual_information_gradient_is_scaled_by_the_world_size():
    # The engine averages gradients over W ranks; the step scales the MI term by W so that the update
    # is the gradient of a_mi * MI(global statistics). With one process the statistics are local, so
    # W = 2 must give exactly the gradient of a doubled MI coefficient.
    plan = make_plan()
    weights = {"shapes": 1.0, "textures": 1.0}
    scaled = LocalEngine(make_model(), lr=1.0)
    make_step(scaled, AuxLossConfig(0.0, 0.0, 0.1), world_size=2)(plan, weights)
    doubled = LocalEngine(make_model(), lr=1.0)
    make_step(doubled, AuxLossConfig(0.0, 0.0, 0.2), world_size=1)(plan, weights)
    for (name, a), (_, b) in zip(scaled.module.named_parameters(), doubled.module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_move_batch_moves_nested_tensors_and_keeps_the_rest():
    boxes = torch.zeros(1, 4)
    batch = {
        "images": torch.zeros(1, 3, 2, 2),
        "targets": [{"boxes": boxes}],
        "keys": ["a"],
        "num_skipped": 0,
    }
    moved = move_batch(batch, torch.device("meta"))
    assert moved["images"].is_meta and moved["targets"][0]["boxes"].is_meta
    assert moved["keys"] == ["a"] and moved["num_skipped"] == 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_callers_figures_ride_on_the_steps_reduce_once(accumulation):
    """The loop's loader counts are summed with the step's own figures (first round only), not added per
    round and not lost to a second collective."""
    plan = make_plan()
    if accumulation > 1:
        plan = StepPlan(0, plan.batches + make_plan(seed=2).batches, accumulation)
    result = make_step(LocalEngine(make_model()))(
        plan, {"shapes": 1.0, "textures": 1.0}, also_sum=torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    )
    assert result.also_summed == [3.0, 0.0, 4.0]
    assert make_step(LocalEngine(make_model()))(plan, {"shapes": 1.0, "textures": 1.0}).also_summed == []
