"""The real training step (moevit.train.step.MultiTaskStep) through the real DeepSpeed engine.

Classification, detection (RetinaNet) and segmentation (UperNet) heads, the load-balance, z- and
mutual-information losses and uncertainty loss weighting, for STEPS steps whose task sets vary (all
three, then classification alone, then detection and segmentation: the MI rows of the tasks a step
does not train come from the running estimate). Two launches:

- 2 gloo processes, each with its half of every task's global batch: for ZeRO 0, 1 and 2, a run at
  ep_size 1 (pure data parallel) and one at ep_size 2. EP=2 must equal EP=1 on every logged figure and
  on the final (gathered) weights. Same ranks, same per-rank batches and dropout masks: the two differ
  only in where the experts' rows are computed and how the expert gradients are reduced.
- 1 process on the whole global batch, against a 2-process EP=2 run: the MI the step computes across
  ranks equals the MI of the global batch on one process, and so do the first step's gradients, every
  step's logged figures and the final weights. Two terms are left out of this comparison, because they
  are per-rank by definition, not by accident: the load-balance loss (Switch's f_e P_e of each rank's
  batch, as in DeepSpeed) and the segmentation head's dropout (masks drawn per rank). Both are on in the
  EP=2 == EP=1 comparison above. A control run without MI's factor W shows the comparison fails when the
  cross-rank MI gradient is wrong, and a 1-process run with the images reversed measures its noise floor.

Tolerances (not bit-exact: float summation order) are stated, with what was measured, at their
definitions below.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch
from engine_fixtures import (
    GROUP_TIMEOUT,
    THREE_TASK_TYPES,
    RecordingEngine,
    make_three_task_config,
    make_three_task_model,
    three_task_batches,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 2 launches, ~60 s together

STEPS = 5
STAGES = (0, 1, 2)
IMAGE_SIZE = 32
GLOBAL_BATCH = 4  # images per task and step, split evenly over the ranks
TASKS_OF_STEP = (("cls", "det", "seg"), ("cls",), ("det", "seg"))  # cycled over the steps
OPTIM = {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 0.5}  # the schedule leaves warmup; clipping is active
BALANCING = {"method": "uncertainty", "lr": 0.1}
USERS_AUX = {"load_balance": 0.01, "z_loss": 0.001, "mutual_information": 0.5}
NUM_EXPERTS = 4  # moevit_debug's


class Tolerances(NamedTuple):
    logged: float  # every logged figure of every step, relative to its size (absolute below 1)
    weights: float  # the final weights, absolute


# Not bit-exact: float summation order. EP=2 vs EP=1 on the same 2 ranks: the dense computation is the
# same, the experts' rows are computed on another rank and in another order, and an expert's gradient is
# summed inside one rank's backward (EP=2) instead of averaged over the ranks (EP=1). Measured over 5
# steps (ZeRO 0, 1, 2): logged figures 9e-8 relative, final weights 1.6e-6.
SAME_RANKS_TOLERANCES = Tolerances(logged=1e-5, weights=1e-5)
# 2 ranks vs 1 process on the global batch: every gradient is summed in another order (a batch of 4 in one
# backward, against 2 + 2 averaged by the engine). The first step's gradients differ by 8.5e-6 of their
# largest entry (measured; the control without MI's factor W: 0.45). AdamW's first steps are near
# sign(g) * lr, so an element whose gradient is near 0 turns that noise into a lr-sized difference, and
# the runs part slowly: after 5 steps, logged figures 4.5e-6 relative, weights 3.7e-4 (the same objective
# on one process with the images in reverse order: 2.2e-5 and 7.5e-4, test_the_noise_floor_...).
GRADIENT_TOLERANCE = 1e-4
ONE_PROCESS_TOLERANCES = Tolerances(logged=1e-4, weights=2e-3)


def plan_of(step: int, rank: int, world_size: int, reverse: bool = False):
    """This rank's share of the step's global batches; `reverse`: the images in the opposite order."""
    from moevit.data.multitask import StepPlan, TaskBatch

    share = GLOBAL_BATCH // world_size
    rows = list(range(GLOBAL_BATCH))[:: -1 if reverse else 1][rank * share : (rank + 1) * share]
    batches = three_task_batches(GLOBAL_BATCH, IMAGE_SIZE, seed=step)
    items = []
    for task in TASKS_OF_STEP[step % len(TASKS_OF_STEP)]:
        batch = {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batches[task].items()}
        items.append(TaskBatch(task, batch))
    return StepPlan(step, tuple(items))


def run_spec(stage: int = 0, ep_size: int = 2, global_batch: bool = False, **options) -> dict:
    """One run of `train_worker`: its ZeRO stage and ep_size; `global_batch`: without the per-rank terms
    (load balance, segmentation dropout; see the module docstring). `options`: reverse (the images of
    every batch in the opposite order), step_world_size (the world size MultiTaskStep is told)."""
    aux = {**USERS_AUX, "load_balance": 0.0} if global_batch else USERS_AUX
    return {
        "stage": stage,
        "ep_size": ep_size,
        "aux": aux,
        "seg_dropout": 0.0 if global_batch else 0.1,
        **options,
    }


def train_worker(runs: dict[str, dict]) -> dict:
    """One rank: every run of `runs` (run_spec) from a fresh model and engine, STEPS steps each."""
    import torch.distributed as dist

    from moevit.config.schema import AuxLossConfig, LossBalancingConfig
    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import ensure_expert_groups, initialize_distributed
    from moevit.train.balancing import build_balancer
    from moevit.train.step import MultiTaskStep

    env = initialize_distributed(make_three_task_config(1, 0, STEPS, **OPTIM), timeout=GROUP_TIMEOUT)
    for ep_size in sorted({run["ep_size"] for run in runs.values()}):
        ensure_expert_groups(ep_size)
    prior = dict.fromkeys(THREE_TASK_TYPES, 1 / len(THREE_TASK_TYPES))
    results = {}
    for name, run in runs.items():
        cfg = make_three_task_config(run["ep_size"], run["stage"], STEPS, **OPTIM)
        engine = RecordingEngine(
            build_engine(make_three_task_model(IMAGE_SIZE, run["seg_dropout"]), cfg, env)
        )
        step = MultiTaskStep(
            engine,
            list(THREE_TASK_TYPES),
            AuxLossConfig(**run["aux"]),
            prior,
            run.get("step_world_size", env.world_size),
            torch.device("cpu"),
        )
        balancer = build_balancer(LossBalancingConfig(**BALANCING), dict.fromkeys(THREE_TASK_TYPES, 1.0))
        torch.manual_seed(100 + env.rank)  # each rank's dropout stream, the same in every run
        logged, first_gradients = [], None
        for index in range(STEPS):
            weights = balancer.weights()
            result = step(
                plan_of(index, env.rank, env.world_size, run.get("reverse", False)), weights, index + 1
            )
            balancer.update({task: values["loss"] for task, values in result.task_losses.items()})
            first_gradients = first_gradients or engine.gradients
            logged.append(
                {
                    "total": result.total,
                    "mutual_information": result.mutual_information,
                    "weights": weights,
                    **{f"{t}/{k}": v for t, values in result.task_losses.items() for k, v in values.items()},
                }
            )
        results[name] = {
            "logged": logged,
            "first_gradients": first_gradients,  # reduced over ranks, before clipping and AdamW
            "final": gather_single_device_state_dict(engine.module),
            "estimate": step.task_expert_mass.state_dict(),
            "skipped": step.skipped_steps,
        }
    dist.destroy_process_group()
    return results


def two_rank_runs() -> dict[str, dict]:
    runs = {f"zero{s}_ep{ep}": run_spec(s, ep) for s in STAGES for ep in (1, 2)}
    # The control: MI's gradient without its factor W (the engine averages the ranks' gradients).
    return {
        **runs,
        "global_batch_ep2": run_spec(global_batch=True),
        "global_batch_ep2_mi_unscaled": run_spec(global_batch=True, step_world_size=1),
    }


@pytest.fixture(scope="module")
def two_ranks(run_workers):
    return run_workers(train_worker, world_size=2, timeout_s=400, runs=two_rank_runs())


@pytest.fixture(scope="module")
def one_process(run_workers):
    # The reversed run measures the noise floor: the same objective, summed in another order.
    runs = {
        "global_batch": run_spec(ep_size=1, global_batch=True),
        "reversed": run_spec(ep_size=1, global_batch=True, reverse=True),
    }
    return run_workers(train_worker, world_size=1, timeout_s=200, runs=runs)[0]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Over the weights; routers' `usage` counters count each rank's own tokens."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a if not k.endswith(".usage"))


def assert_same_run(got: dict, expected: dict, what: str, tolerances: Tolerances, per_rank=()) -> None:
    """Every logged figure of every step (but those ending in `per_rank`) and the running MI estimate
    within `tolerances.logged` relative to their size (the z-loss and the estimate's rows, router mass
    summed over tokens, are ~20), and the final weights within `tolerances.weights`."""
    assert got["skipped"] == expected["skipped"] == 0, what
    worst = 0.0
    for step, (a, b) in enumerate(zip(got["logged"], expected["logged"], strict=True)):
        assert a.keys() == b.keys(), f"{what}, step {step}"
        for key, value in b.items():
            if key.endswith(per_rank):
                continue
            close = pytest.approx(value, rel=tolerances.logged, abs=tolerances.logged)
            assert a[key] == close, f"{what}, step {step}: {key}"
            if isinstance(value, float):
                worst = max(worst, abs(a[key] - value) / max(abs(value), 1.0))
    assert got["estimate"]["seen"] == expected["estimate"]["seen"], what
    for a, b in zip(got["estimate"]["rows"], expected["estimate"]["rows"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=tolerances.logged, atol=0, msg=what)
    difference, key = largest_difference(got["final"], expected["final"])
    # Shown with pytest -s: the measured differences the tolerances' comments quote.
    print(
        f"{what}: logged figures differ by {worst:.3g} (relative), final weights by {difference:.3g} ({key})"
    )
    assert difference <= tolerances.weights, f"{what}: {key} differs by {difference:.3g}"


def global_expert_names(
    gradients: dict[str, torch.Tensor], rank: int, ep_size: int
) -> dict[str, torch.Tensor]:
    """This rank's expert gradients renamed from its local expert index to the global one."""
    local_experts = NUM_EXPERTS // ep_size

    def rename(name: str) -> str:
        match = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if match is None:
            return name
        return name.replace(
            match.group(0), f"deepspeed_experts.{rank * local_experts + int(match.group(1))}."
        )

    return {rename(name): gradient for name, gradient in gradients.items()}


def gradient_differences(got: dict, expected: dict, rank: int) -> dict[str, float]:
    """Per parameter this rank holds: the largest difference of the first step's reduced gradients,
    relative to the largest entry of the expected gradient."""
    gradients = global_expert_names(got["first_gradients"], rank, ep_size=2)
    reference = expected["first_gradients"]
    assert gradients.keys() <= reference.keys()
    return {
        name: ((gradient - reference[name]).abs().max() / reference[name].abs().max()).item()
        for name, gradient in gradients.items()
    }


@pytest.mark.parametrize("stage", STAGES)
def test_ep2_equals_ep1_with_the_real_step(two_ranks, stage):
    for rank, runs in enumerate(two_ranks):
        what = f"rank {rank}, ZeRO {stage}"
        assert_same_run(runs[f"zero{stage}_ep2"], runs[f"zero{stage}_ep1"], what, SAME_RANKS_TOLERANCES)
        # ZeRO partitions the optimizer state and gradients, it does not change the update.
        assert_same_run(
            runs[f"zero{stage}_ep2"], runs["zero0_ep1"], f"{what} vs ZeRO 0", SAME_RANKS_TOLERANCES
        )


def test_the_runs_compared_are_not_trivial(two_ranks):
    """What the comparisons above rest on: every loss term is on, and the weights moved."""
    run = two_ranks[0]["zero2_ep2"]
    first, second = run["logged"][0], run["logged"][1]
    assert first["mutual_information"] < -1e-3 and second["mutual_information"] < -1e-3
    for task in THREE_TASK_TYPES:
        assert first[f"{task}/load_balance"] > 0 and first[f"{task}/z_loss"] > 0
    assert any(abs(w - 1.0) > 1e-3 for w in run["logged"][-1]["weights"].values())  # the balancer learned
    initial = make_three_task_model(IMAGE_SIZE).state_dict()
    # The gates' weights and the experts; not the gates' selection biases, buffers no step trains.
    moved = [k for k in initial if (".router.gates." in k and k.endswith(".weight")) or ".experts." in k]
    assert moved and all((run["final"][k] - initial[k]).abs().max() > 1e-5 for k in moved)
    # The 2-task and 1-task plans left a row of the running MI estimate for every task.
    assert run["estimate"]["seen"] == [True, True, True]


def test_mi_across_ranks_equals_mi_of_the_global_batch_on_one_process(two_ranks, one_process):
    reference = one_process["global_batch"]
    for rank, runs in enumerate(two_ranks):
        run, what = runs["global_batch_ep2"], f"rank {rank}, EP=2 on 2 ranks vs 1 process"
        # Step 1, same weights: the MI the ranks compute together is the global batch's.
        first_mi = reference["logged"][0]["mutual_information"]
        assert run["logged"][0]["mutual_information"] == pytest.approx(first_mi, rel=1e-6, abs=1e-7), what
        # Its gradient (and every other) is the global batch's: dense, gates and this rank's experts.
        differences = gradient_differences(run, reference, rank)
        assert any(".router.gates." in name for name in differences)
        assert any("deepspeed_experts" in name for name in differences)
        worst = max(differences, key=differences.get)
        print(
            f"{what}: first-step gradients differ by {differences[worst]:.3g} of their largest entry "
            f"({worst})"
        )
        assert differences[worst] <= GRADIENT_TOLERANCE, f"{what}: the gradient of {worst}"
        # Then every step's MI, losses and loss weights, the running MI estimate and the final weights.
        # The logged load-balance figure is measured on each rank's batch (its coefficient is 0 here).
        assert_same_run(run, reference, what, ONE_PROCESS_TOLERANCES, per_rank=("/load_balance",))


def test_the_global_batch_comparison_catches_a_missing_factor_w(two_ranks, one_process):
    """The control: told world size 1, the step leaves out MI's factor W, so the engine's average over
    the ranks carries half of MI's gradient. The gradient check sees it at once."""
    reference = one_process["global_batch"]
    run = two_ranks[0]["global_batch_ep2_mi_unscaled"]
    gates = {k: v for k, v in gradient_differences(run, reference, 0).items() if ".router.gates." in k}
    assert max(gates.values()) > 100 * GRADIENT_TOLERANCE
    assert largest_difference(run["final"], reference["final"])[0] > ONE_PROCESS_TOLERANCES.weights


def test_the_noise_floor_of_the_global_batch_comparison(one_process):
    """The tolerances of the global-batch comparison are a few times what the same objective, on one
    process, gives with the images of every batch in the opposite order (measured values: see
    ONE_PROCESS_TOLERANCES)."""
    reordered, reference = one_process["reversed"], one_process["global_batch"]
    assert_same_run(reordered, reference, "1 process, images reversed", ONE_PROCESS_TOLERANCES)
    noise = largest_difference(reordered["final"], reference["final"])[0]
    assert noise > 0  # a different summation order, so not bit-identical: the floor is real
