"""Gradient accumulation on the real DeepSpeed engine and MultiTaskStep, one gloo process: two rounds of
B images per task against one round of 2B, with classification, detection and segmentation and the MI
loss on. The gradient the engine holds at the boundary (after its 1/G averaging, before clipping and
AdamW) must match the big batch's within fp32 tolerance: classification and RetinaNet average over
images, MI is exact through the no-grad statistics pass, and the segmentation masks have equal valid
pixels per round (its loss divides by each round's valid pixels). A NaN in the last round skips the
whole step: no update, and the next step equals a fresh engine's.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import (
    GROUP_TIMEOUT,
    THREE_TASK_CLASSES,
    THREE_TASK_TYPES,
    RecordingEngine,
    make_three_task_config,
    make_three_task_model,
)

pytestmark = pytest.mark.distributed

IMAGE_SIZE = 64
B = 2  # images per task and round
TASK_TYPES = THREE_TASK_TYPES
NUM_CLASSES = THREE_TASK_CLASSES


def make_config(grad_accum_steps: int):
    return make_three_task_config(
        1, 0, 4, grad_accum_steps, lr=1e-3, min_lr=1e-5, warmup_steps=0, grad_clip=0.0
    )


def make_model():
    return make_three_task_model(IMAGE_SIZE)


def big_batches(seed: int = 0) -> dict[str, dict]:
    """2B images per task; every segmentation image has the same number of valid (non-ignored) pixels."""
    g = torch.Generator().manual_seed(seed)
    images = {t: torch.randn(2 * B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for t in TASK_TYPES}
    boxes = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 28.0, 30.0], [34.0, 30.0, 60.0, 58.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2])},
    ]
    masks = torch.randint(0, NUM_CLASSES["seg"], (2 * B, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    masks[:, :8] = 255
    return {
        "cls": {"images": images["cls"], "labels": torch.randint(0, 10, (2 * B,), generator=g)},
        "det": {"images": images["det"], "targets": [boxes[i % 2] for i in range(2 * B)]},
        "seg": {"images": images["seg"], "masks": masks},
    }


def split(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


def plan_of(batches: dict[str, dict], rounds: int):
    from moevit.data.multitask import StepPlan, TaskBatch

    size = 2 * B // rounds
    items = tuple(
        TaskBatch(t, split(batch, r * size, (r + 1) * size))
        for r in range(rounds)
        for t, batch in batches.items()
    )
    return StepPlan(0, items, rounds)


def accumulation_worker() -> dict:
    import torch.distributed as dist

    from moevit.config.schema import AuxLossConfig
    from moevit.parallel.engine import build_engine
    from moevit.parallel.setup import initialize_distributed
    from moevit.train.step import MultiTaskStep

    env = initialize_distributed(make_config(1), timeout=GROUP_TIMEOUT)
    aux = AuxLossConfig(load_balance=0.0, z_loss=0.001, mutual_information=0.1)
    prior = {t: 1 / 3 for t in TASK_TYPES}
    weights = dict.fromkeys(TASK_TYPES, 1.0)
    results = {}
    for rounds in (1, 2):
        engine = RecordingEngine(build_engine(make_model(), make_config(rounds), env))
        step = MultiTaskStep(engine, list(TASK_TYPES), aux, prior, env.world_size, torch.device("cpu"))
        torch.manual_seed(7)  # the segmentation head's dropout draws the same masks in every run
        result = step(plan_of(big_batches(), rounds), weights)
        results[rounds] = {
            "gradients": engine.gradients,
            "result": result,
            "global_steps": engine.global_steps,
        }
    # Control: each round's MI on its own statistics only (no statistics pass) is not the big batch's.
    engine = RecordingEngine(build_engine(make_model(), make_config(2), env))
    step = MultiTaskStep(engine, list(TASK_TYPES), aux, prior, env.world_size, torch.device("cpu"))
    step.other_rounds_statistics = lambda rounds: [None] * len(rounds)
    torch.manual_seed(7)
    step(plan_of(big_batches(), 2), weights)
    results["per_round_mi"] = engine.gradients
    # A NaN in the last round of step 1 (fault injection): nothing moves, and step 2 is a fresh step 1.
    import dataclasses
    import os

    for stage in (0, 1, 2):
        cfg = make_config(2)
        cfg.parallel = dataclasses.replace(cfg.parallel, zero_stage=stage)
        reference = RecordingEngine(build_engine(make_model(), cfg, env))
        torch.manual_seed(7)
        MultiTaskStep(reference, list(TASK_TYPES), aux, prior, 1, torch.device("cpu"))(
            plan_of(big_batches(), 2), weights
        )
        engine = RecordingEngine(build_engine(make_model(), cfg, env))
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        step = MultiTaskStep(engine, list(TASK_TYPES), aux, prior, env.world_size, torch.device("cpu"))
        os.environ["MOEVIT_FAULT_NONFINITE_LOSS"] = "0:1"
        skipped = step(plan_of(big_batches(seed=1), 2), weights, step=1)
        del os.environ["MOEVIT_FAULT_NONFINITE_LOSS"]
        unchanged = all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
        steps_after_skip = engine.global_steps
        torch.manual_seed(7)
        step(plan_of(big_batches(), 2), weights, step=2)
        results[("skip", stage)] = {
            "skipped": skipped.skipped,
            "unchanged": unchanged,
            "global_steps": (steps_after_skip, engine.global_steps),
            "gradients": engine.gradients,
            "reference": reference.gradients,
        }
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def accumulated(run_workers):
    return run_workers(accumulation_worker, world_size=1, timeout_s=240)[0]


def test_two_rounds_of_b_give_the_gradient_of_one_batch_of_2b(accumulated):
    big, rounds = accumulated[1], accumulated[2]
    assert big["global_steps"] == rounds["global_steps"] == 1  # one optimizer step either way
    assert big["gradients"].keys() == rounds["gradients"].keys()
    gates = [n for n in big["gradients"] if ".router.gates." in n]
    assert gates and all(big["gradients"][n].abs().max() > 0 for n in gates)
    for name, expected in big["gradients"].items():
        torch.testing.assert_close(rounds["gradients"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert rounds["result"].images == big["result"].images == 3 * 2 * B
    assert rounds["result"].mutual_information == pytest.approx(big["result"].mutual_information, rel=1e-5)
    for task in TASK_TYPES:
        assert rounds["result"].task_losses[task]["loss"] == pytest.approx(
            big["result"].task_losses[task]["loss"], rel=1e-5
        )


def test_without_the_statistics_pass_the_mi_gradient_differs(accumulated):
    # Shows the comparison above can fail: the routers' gradients need the whole step's statistics.
    big, per_round = accumulated[1]["gradients"], accumulated["per_round_mi"]
    gates = [n for n in big if ".router.gates." in n]
    worst = max(((per_round[n] - big[n]).abs().max() / big[n].abs().max()).item() for n in gates)
    assert worst > 1e-2


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_nan_in_the_last_round_skips_the_whole_accumulated_step(accumulated, stage):
    skip = accumulated[("skip", stage)]
    assert skip["skipped"] and skip["unchanged"]
    assert skip["global_steps"] == (0, 1)  # the skipped step took no optimizer step
    # The first round's gradients were dropped: the next step's are those of a fresh step on its data.
    assert skip["gradients"].keys() == skip["reference"].keys()
    for name, expected in skip["reference"].items():
        torch.testing.assert_close(skip["gradients"][name], expected, rtol=1e-5, atol=1e-7, msg=name)
