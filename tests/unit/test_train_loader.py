"""`train.sampling` -> TaskSchedule, and the training loader over real (synthetic) data."""

import pytest

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.data.schedule import build_schedule
from moevit.data.synth import write_synthetic_datasets
from moevit.train.loader import build_train_loader

TASKS = ("a", "b")


def make_config(root, **sampling):
    def task(fmt, task_type, batch_size):
        data = {"format": fmt, "root": str(root / fmt), "image_size": 32, "batch_size": batch_size}
        return {"type": task_type, "num_classes": 5, "data": data}

    return build_config(
        Config,
        {
            "tasks": {"a": task("imagenet", "classification", 4), "b": task("ade20k", "segmentation", 2)},
            "train": {"sampling": sampling, "num_workers": 0},
        },
    )


@pytest.mark.parametrize(
    "sampling, probabilities",
    [
        ({}, {"a": 1.0, "b": 1.0}),  # "all": every task every step
        ({"strategy": "round_robin"}, {"a": 0.5, "b": 0.5}),
        ({"strategy": "weighted"}, {"a": 0.5, "b": 0.5}),  # no ratios, no temperature: uniform
        ({"strategy": "weighted", "ratios": {"a": 3, "b": 1}}, {"a": 0.75, "b": 0.25}),
        ({"strategy": "weighted", "temperature": 1.0}, {"a": 0.8, "b": 0.2}),  # proportional to 40 : 10
        ({"strategy": "weighted", "temperature": 2.0}, {"a": 2 / 3, "b": 1 / 3}),  # sqrt(40) : sqrt(10)
    ],
)
def test_schedule_follows_the_sampling_config(tmp_path, sampling, probabilities):
    schedule = build_schedule(make_config(tmp_path, **sampling), {"a": 40, "b": 10})
    assert schedule.step_probabilities == pytest.approx(probabilities)


def test_loader_yields_collated_batches_of_each_rank(tmp_path):
    write_synthetic_datasets(tmp_path, size="tiny")
    loader = build_train_loader(make_config(tmp_path), rank=1, world_size=2)
    plan = next(loader)
    assert plan.tasks == TASKS
    (_, classification), (_, segmentation) = plan
    assert classification["images"].shape == (4, 3, 32, 32) and classification["labels"].shape == (4,)
    assert segmentation["masks"].shape == (2, 32, 32)
    assert loader.expected_ratios() == pytest.approx({"a": 2 / 3, "b": 1 / 3})
