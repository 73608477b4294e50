"""TaskSchedule: determinism from (seed, step), sampling ratios, validation."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moevit.data import schedule as schedule_module
from moevit.data.schedule import TaskSchedule

TASKS = ("cls", "det", "seg")


def sequence(schedule: TaskSchedule, num_steps: int) -> list[tuple[str, ...]]:
    return [schedule.tasks_at(step) for step in range(num_steps)]


def test_same_seed_gives_same_sequence_and_other_seed_differs():
    first = TaskSchedule(TASKS, "weighted", ratios={"cls": 1, "det": 2, "seg": 3}, seed=7)
    second = TaskSchedule(TASKS, "weighted", ratios={"cls": 1, "det": 2, "seg": 3}, seed=7)
    other = TaskSchedule(TASKS, "weighted", ratios={"cls": 1, "det": 2, "seg": 3}, seed=8)
    assert sequence(first, 500) == sequence(second, 500)
    assert sequence(first, 500) != sequence(other, 500)


def test_rebuilt_schedule_gives_the_same_plan_far_ahead_without_iterating():
    walked = TaskSchedule(TASKS, "weighted", dataset_sizes={"cls": 1000, "det": 300, "seg": 50}, seed=3)
    plans = sequence(walked, 10_001)
    rebuilt = TaskSchedule(TASKS, "weighted", dataset_sizes={"cls": 1000, "det": 300, "seg": 50}, seed=3)
    assert rebuilt.tasks_at(10_000) == plans[10_000]
    assert rebuilt.tasks_at(0) == plans[0]


def test_plan_ignores_global_rng_state():
    schedule = TaskSchedule(TASKS, "weighted", seed=11)
    before = sequence(schedule, 200)
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.rand(10)
    torch.rand(10)
    assert sequence(schedule, 200) == before


def test_every_rank_process_computes_the_same_plan():
    """Ranks are separate processes; a salted hash or process-local RNG would make them disagree."""
    # The child loads the schedule module file alone, skipping the slow imports of the moevit.data package.
    code = (
        "import importlib.util, sys;"
        "spec = importlib.util.spec_from_file_location('schedule', sys.argv[1]);"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module);"
        "s = module.TaskSchedule(('cls', 'det', 'seg'), 'weighted', ratios={'cls': 1, 'det': 2, 'seg': 3}, seed=5);"
        "print(''.join(s.tasks_at(i)[0][0] for i in range(300)))"
    )
    plans = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code, schedule_module.__file__],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        plans.append(result.stdout.strip())
    here = TaskSchedule(TASKS, "weighted", ratios={"cls": 1, "det": 2, "seg": 3}, seed=5)
    assert plans[0] == plans[1] == "".join(here.tasks_at(i)[0][0] for i in range(300))


def test_task_counts_agree_with_tasks_at():
    schedule = TaskSchedule(TASKS, "weighted", ratios={"cls": 5, "det": 1, "seg": 1}, seed=2)
    counted = {t: 0 for t in TASKS}
    for step in range(100, 1100):
        (task,) = schedule.tasks_at(step)
        counted[task] += 1
    assert schedule.task_counts(1000, start=100) == counted


def test_weighted_fixed_ratios_match_empirical_frequencies():
    schedule = TaskSchedule(TASKS, "weighted", ratios={"cls": 1, "det": 2, "seg": 5}, seed=0)
    expected = {"cls": 1 / 8, "det": 2 / 8, "seg": 5 / 8}
    assert schedule.expected_ratios() == pytest.approx(expected)
    # 200k draws: standard error of each frequency is below 0.0011.
    assert schedule.empirical_ratios(200_000) == pytest.approx(expected, abs=0.005)


def test_ratios_count_samples_with_per_task_batch_sizes():
    batch_sizes = {"cls": 32, "det": 8, "seg": 8}
    weighted = TaskSchedule(TASKS, "weighted", seed=1)
    assert weighted.expected_ratios(batch_sizes) == pytest.approx(
        {"cls": 32 / 48, "det": 8 / 48, "seg": 8 / 48}
    )
    assert weighted.empirical_ratios(100_000, batch_sizes) == pytest.approx(
        weighted.expected_ratios(batch_sizes), abs=0.01
    )
    every_step = TaskSchedule(TASKS, "all")
    assert every_step.expected_ratios(batch_sizes) == every_step.empirical_ratios(7, batch_sizes)
    assert every_step.expected_ratios(batch_sizes)["cls"] == pytest.approx(32 / 48)


def test_temperature_moves_from_proportional_to_uniform():
    sizes = {"cls": 900, "det": 100}
    proportional = TaskSchedule(("cls", "det"), "weighted", dataset_sizes=sizes, temperature=1.0)
    square_root = TaskSchedule(("cls", "det"), "weighted", dataset_sizes=sizes, temperature=2.0, seed=4)
    uniform = TaskSchedule(("cls", "det"), "weighted", dataset_sizes=sizes, temperature=math.inf)
    assert proportional.expected_ratios() == pytest.approx({"cls": 0.9, "det": 0.1})
    assert square_root.expected_ratios() == pytest.approx({"cls": 0.75, "det": 0.25})
    assert uniform.expected_ratios() == pytest.approx({"cls": 0.5, "det": 0.5})
    assert square_root.empirical_ratios(100_000) == pytest.approx({"cls": 0.75, "det": 0.25}, abs=0.01)


def test_tiny_temperature_does_not_overflow():
    schedule = TaskSchedule(
        ("cls", "det"), "weighted", dataset_sizes={"cls": 10**9, "det": 10}, temperature=1e-3
    )
    assert schedule.expected_ratios() == pytest.approx({"cls": 1.0, "det": 0.0})


def test_round_robin_is_exact():
    schedule = TaskSchedule(TASKS, "round_robin")
    assert sequence(schedule, 6) == [("cls",), ("det",), ("seg",)] * 2
    assert schedule.empirical_ratios(300) == {t: 1 / 3 for t in TASKS}
    assert schedule.task_counts(301) == {"cls": 101, "det": 100, "seg": 100}


def test_all_trains_every_task_in_order():
    schedule = TaskSchedule(TASKS, "all")
    assert schedule.tasks_at(0) == schedule.tasks_at(12_345) == TASKS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "random"}, "unknown schedule strategy 'random'"),
        (
            {"strategy": "weighted", "ratios": {"cls": 1, "det": 1, "seg": 1, "depth": 1}},
            r"unknown tasks \['depth'\]",
        ),
        ({"strategy": "weighted", "ratios": {"cls": 1, "det": 1}}, r"miss tasks \['seg'\]"),
        (
            {"strategy": "weighted", "ratios": {"cls": 1, "det": 0, "seg": 1}},
            r"ratios\['det'\] must be a finite number > 0",
        ),
        ({"strategy": "weighted", "ratios": {"cls": 1, "det": -2, "seg": 1}}, r"ratios\['det'\]"),
        ({"strategy": "weighted", "ratios": {"cls": 1, "det": math.nan, "seg": 1}}, r"ratios\['det'\]"),
        (
            {"strategy": "weighted", "dataset_sizes": {"cls": 1, "det": 0, "seg": 1}},
            r"dataset_sizes\['det'\]",
        ),
        (
            {"strategy": "weighted", "dataset_sizes": {"cls": 1, "det": 1, "seg": 1}, "temperature": 0},
            "temperature must be > 0",
        ),
        ({"strategy": "weighted", "temperature": -1.0}, "temperature must be > 0"),
        ({"strategy": "weighted", "temperature": math.nan}, "temperature must be > 0"),
        (
            {"strategy": "weighted", "ratios": {"cls": 1, "det": 1, "seg": 1}, "temperature": 2.0},
            "temperature applies",
        ),
        (
            {
                "strategy": "weighted",
                "ratios": {"cls": 1, "det": 1, "seg": 1},
                "dataset_sizes": {"cls": 1, "det": 1, "seg": 1},
            },
            "either ratios or dataset_sizes",
        ),
        ({"strategy": "all", "ratios": {"cls": 1, "det": 1, "seg": 1}}, "'all' takes no ratios"),
        ({"strategy": "round_robin", "temperature": 2.0}, "'round_robin' takes no ratios"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSchedule(TASKS, **kwargs)


def test_bad_tasks_steps_and_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one task"):
        TaskSchedule(())
    with pytest.raises(ValueError, match=r"duplicate task names \['cls'\]"):
        TaskSchedule(("cls", "det", "cls"))
    schedule = TaskSchedule(TASKS, "round_robin")
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        schedule.tasks_at(-1)
    with pytest.raises(ValueError, match="batch_sizes must name exactly"):
        schedule.expected_ratios({"cls": 4})
    with pytest.raises(ValueError, match=r"batch_sizes\['det'\] must be an int > 0"):
        schedule.expected_ratios({"cls": 4, "det": 0, "seg": 2})
