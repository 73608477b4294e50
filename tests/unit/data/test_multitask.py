"""MultiTaskLoader: exact mid-epoch resume (with and without workers), disjoint ranks, ratios, skips."""

import json

import pytest
import torch
from torch.utils.data import Dataset

from moevit.data.multitask import MultiTaskLoader, count_skipped
from moevit.data.schedule import TaskSchedule

SIZES = {"cls": 7, "det": 11, "seg": 5}
BATCH_SIZES = {"cls": 3, "det": 2, "seg": 4}


class IndexDataset(Dataset):
    """Sample i is {"id": i, "num_skipped": 1 if i is a multiple of 3 else 0}; counts reads."""

    def __init__(self, size: int):
        self.size = size
        self.reads = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, int]:
        self.reads += 1
        return {"id": index, "num_skipped": int(index % 3 == 0)}


def make_loader(
    strategy: str = "weighted", num_workers: int = 0, rank: int = 0, world_size: int = 1, **kwargs
):
    schedule = TaskSchedule(tuple(SIZES), strategy, seed=1)
    datasets = {t: IndexDataset(n) for t, n in SIZES.items()}
    return MultiTaskLoader(
        datasets,
        BATCH_SIZES,
        None,
        schedule,
        rank=rank,
        world_size=world_size,
        seed=2,
        num_workers=num_workers,
        **kwargs,
    )


def run(loader: MultiTaskLoader, num_steps: int) -> list[tuple[int, str, list[int]]]:
    seen = []
    for _, plan in zip(range(num_steps), loader):
        seen.extend((plan.step, task, batch["id"].tolist()) for task, batch in plan)
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_replays_the_identical_sample_order(num_workers):
    steps = 12
    uninterrupted = run(make_loader(num_workers=num_workers), 2 * steps)

    first = make_loader(num_workers=num_workers)
    first_half = run(first, steps)
    # JSON round trip: the state must survive any checkpoint format.
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = make_loader(num_workers=num_workers)
    second.load_state_dict(state)
    second_half = run(second, steps)
    final_state = second.state_dict()
    second.close()

    assert first_half + second_half == uninterrupted
    # The case is a real one: the saved point is mid-epoch and every task wraps into a new epoch.
    assert any(saved["sampler"]["position"] > 0 for saved in state["tasks"].values())
    assert all(final_state["tasks"][t]["samples_consumed"] > n for t, n in SIZES.items())


def test_ranks_follow_the_same_tasks_and_read_disjoint_data():
    ranks = [make_loader("all", rank=r, world_size=2) for r in range(2)]
    # det has 11 samples: 6 per rank per epoch (one padded), i.e. 3 steps of batch size 2.
    plans = [run(loader, 3) for loader in ranks]
    assert [(step, task) for step, task, _ in plans[0]] == [(step, task) for step, task, _ in plans[1]]
    det_ids = [[i for _, task, ids in plan if task == "det" for i in ids] for plan in plans]
    assert set(det_ids[0]) | set(det_ids[1]) == set(range(11))
    assert len(set(det_ids[0]) & set(det_ids[1])) <= 1


def test_only_scheduled_tasks_are_read():
    datasets = {t: IndexDataset(n) for t, n in SIZES.items()}
    loader = MultiTaskLoader(datasets, BATCH_SIZES, None, TaskSchedule(tuple(SIZES), "round_robin"))
    next(loader)
    assert [datasets[t].reads for t in SIZES] == [BATCH_SIZES["cls"], 0, 0]


def test_loading_leaves_the_global_torch_rng_alone():
    """The trainer checkpoints the torch RNG; lazily built DataLoaders must not draw from it."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    run(make_loader(), 6)
    assert torch.equal(torch.get_rng_state(), before)


def test_effective_ratios_count_consumed_samples():
    loader = make_loader("round_robin")
    assert loader.effective_ratios() == {t: 0.0 for t in SIZES}
    run(loader, 6)
    total = 2 * sum(BATCH_SIZES.values())
    assert loader.effective_ratios() == {t: 2 * b / total for t, b in BATCH_SIZES.items()}
    assert loader.effective_ratios() == pytest.approx(loader.expected_ratios())


def test_skipped_counts_accumulate_and_survive_resume():
    def expected_skips(seen):
        counts = {t: 0 for t in SIZES}
        for _, task, ids in seen:
            counts[task] += sum(i % 3 == 0 for i in ids)
        return counts

    first = make_loader()
    seen = run(first, 8)
    assert first.skipped_counts() == expected_skips(seen)
    assert sum(first.skipped_counts().values()) > 0
    second = make_loader()
    second.load_state_dict(first.state_dict())
    seen += run(second, 8)
    assert second.skipped_counts() == expected_skips(seen)


def test_skipped_counts_from_collated_ints_and_sample_lists():
    assert count_skipped({"image": torch.zeros(2), "num_skipped": 3}) == 3
    assert count_skipped({"num_skipped": torch.tensor([1, 0, 2])}) == 3
    assert count_skipped([{"num_skipped": 1}, {"num_skipped": 2}, {"key": "x"}]) == 3
    assert count_skipped((torch.zeros(2, 3), [{"num_skipped": 1}, {}])) == 1
    assert count_skipped(torch.zeros(4)) == 0


def test_a_custom_collate_reporting_skips_is_counted():
    def collate(samples):
        return {"ids": [s["id"] for s in samples], "num_skipped": 5}

    schedule = TaskSchedule(("cls",), "all")
    loader = MultiTaskLoader({"cls": IndexDataset(4)}, {"cls": 2}, {"cls": collate}, schedule)
    run_ids = [plan.batches[0].batch["ids"] for _, plan in zip(range(3), loader)]
    assert len(run_ids) == 3
    assert loader.skipped_counts() == {"cls": 15}


def test_state_from_another_world_size_is_refused_naming_the_task():
    state = make_loader(world_size=2).state_dict()
    with pytest.raises(ValueError, match=r"task 'cls'.*world_size: saved 2, now 1"):
        make_loader(world_size=1).load_state_dict(state)


def test_bad_configuration_is_refused():
    schedule = TaskSchedule(("cls", "det"), "all")
    datasets = {"cls": IndexDataset(4), "det": IndexDataset(4)}
    with pytest.raises(ValueError, match=r"batch_sizes must name exactly.*missing \['det'\]"):
        MultiTaskLoader(datasets, {"cls": 2}, None, schedule)
    with pytest.raises(ValueError, match=r"datasets must name exactly.*unknown \['seg'\]"):
        MultiTaskLoader({**datasets, "seg": IndexDataset(1)}, {"cls": 2, "det": 2}, None, schedule)
    with pytest.raises(ValueError, match="dataset of task 'det' is empty"):
        MultiTaskLoader({**datasets, "det": IndexDataset(0)}, {"cls": 2, "det": 2}, None, schedule)
    with pytest.raises(ValueError, match=r"collate_fns name unknown tasks \['seg'\]"):
        MultiTaskLoader(datasets, {"cls": 2, "det": 2}, {"seg": list}, schedule)
    with pytest.raises(ValueError, match="persistent_workers and prefetch_factor need num_workers > 0"):
        MultiTaskLoader(datasets, {"cls": 2, "det": 2}, None, schedule, persistent_workers=True)


def samples_per_step(loader: MultiTaskLoader, num_steps: int) -> list[tuple[int, tuple[str, ...], dict]]:
    """Per step: its tasks and each task's sample ids, concatenated over the step's rounds."""
    steps = []
    for _, plan in zip(range(num_steps), loader):
        ids: dict[str, list[int]] = {}
        for task, batch in plan:
            ids.setdefault(task, []).extend(batch["id"].tolist())
        steps.append((plan.step, plan.tasks, ids))
    return steps


def test_accumulation_reads_the_samples_of_one_batch_of_g_times_b_with_the_steps_tasks():
    accumulated = make_loader(accumulation=2)
    plans = [next(accumulated) for _ in range(3)]
    assert all(len(plan.rounds()) == 2 for plan in plans)
    assert all(p.tasks == r.tasks for p in plans for r in p.rounds())  # every round trains the step's tasks
    big = MultiTaskLoader(
        {t: IndexDataset(n) for t, n in SIZES.items()},
        {t: 2 * b for t, b in BATCH_SIZES.items()},
        None,
        TaskSchedule(tuple(SIZES), "weighted", seed=1),
        seed=2,
    )
    assert samples_per_step(make_loader(accumulation=2), 10) == samples_per_step(big, 10)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_accumulation_replays_the_identical_sample_order(num_workers):
    steps = 5
    uninterrupted = run(make_loader(num_workers=num_workers, accumulation=3), 2 * steps)
    first = make_loader(num_workers=num_workers, accumulation=3)
    first_half = run(first, steps)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["step"] == steps  # optimizer steps, whatever the accumulation
    second = make_loader(num_workers=num_workers, accumulation=3)
    second.load_state_dict(state)
    second_half = run(second, steps)
    second.close()
    assert first_half + second_half == uninterrupted


def test_changing_the_accumulation_on_resume_continues_the_sample_streams():
    # A resumed run may change train.grad_accum_steps: the step index and every task's sample position
    # carry over, so the streams continue where they stopped, only G x B samples a step instead.
    first = make_loader("all", accumulation=2)
    run(first, 2)
    second = make_loader("all", accumulation=1)
    second.load_state_dict(first.state_dict())
    continued = samples_per_step(second, 1)[0]
    reference = samples_per_step(make_loader("all", accumulation=1), 5)
    for task in SIZES:
        ids = [i for _, _, by_task in reference for i in by_task[task]]
        assert continued[2][task] == ids[4 * BATCH_SIZES[task] : 5 * BATCH_SIZES[task]]
    with pytest.raises(ValueError, match="accumulation must be an int >= 1"):
        make_loader(accumulation=0)
