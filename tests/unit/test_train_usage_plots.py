"""Expert usage: counts between evaluations (accumulation, reset), their moving average, resume state,
JSON and heatmap files."""

import json

import torch

from moevit.train.usage_plots import ExpertUsage, write_usage_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def step_counts(scale: int) -> dict:
    return {
        "blocks.1.mlp": {"a": torch.tensor([1, 0, 3]) * scale, "b": torch.tensor([0, 2, 2]) * scale},
        "blocks.3.mlp": {"a": torch.tensor([4, 0, 0]) * scale, "b": torch.tensor([0, 0, 0])},  # b: none there
    }


def test_counts_accumulate_per_layer_and_task_until_reset():
    usage = ExpertUsage(["a", "b"], ema_decay=0.5)
    usage.add(step_counts(1))
    usage.add(step_counts(2))
    report = usage.reduce_and_reset(step=5, device=torch.device("cpu"))
    assert report == {
        "step": 5,
        "since_step": 0,
        "layers": {
            "blocks.1.mlp": {"a": [3, 0, 9], "b": [0, 6, 6]},
            "blocks.3.mlp": {"a": [12, 0, 0], "b": [0, 0, 0]},
        },
        "ema_decay": 0.5,
        "ema": {  # the first step's counts, then 0.5 old + 0.5 new
            "blocks.1.mlp": {"a": [1.5, 0.0, 4.5], "b": [0.0, 3.0, 3.0]},
            "blocks.3.mlp": {"a": [6.0, 0.0, 0.0], "b": [0.0, 0.0, 0.0]},
        },
    }
    usage.add(step_counts(1))
    assert usage.reduce_and_reset(step=7, device=torch.device("cpu"))["since_step"] == 5


def test_the_average_moves_only_for_the_tasks_a_step_trains_and_outlives_the_reset():
    usage = ExpertUsage(["a", "b"], ema_decay=0.5)
    usage.add(step_counts(1))
    usage.reduce_and_reset(step=1, device=torch.device("cpu"))
    only_a = {layer: {"a": by_task["a"]} for layer, by_task in step_counts(3).items()}
    usage.add(only_a)
    report = usage.reduce_and_reset(step=2, device=torch.device("cpu"))
    assert report["ema"]["blocks.1.mlp"] == {"a": [2.0, 0.0, 6.0], "b": [0.0, 2.0, 2.0]}
    assert report["layers"]["blocks.1.mlp"] == {"a": [3, 0, 9], "b": [0, 0, 0]}


def test_state_round_trips_through_json():
    usage = ExpertUsage(["a", "b"], ema_decay=0.9)
    usage.add(step_counts(1))
    usage.reduce_and_reset(step=3, device=torch.device("cpu"))
    usage.add(step_counts(2))
    restored = ExpertUsage(["a", "b"], ema_decay=0.9)
    restored.load_state_dict(json.loads(json.dumps(usage.state_dict())))
    cpu = torch.device("cpu")
    assert restored.reduce_and_reset(6, cpu) == usage.reduce_and_reset(6, cpu)


def test_report_files_json_and_one_heatmap_per_layer(tmp_path):
    usage = ExpertUsage(["a", "b"], ema_decay=0.9)
    usage.add(step_counts(1))
    report = usage.reduce_and_reset(step=20, device=torch.device("cpu"))
    written = write_usage_report(tmp_path, report)
    assert [path.name for path in written] == [
        "usage_step0000020.json",
        "usage_step0000020_blocks.1.mlp.png",
        "usage_step0000020_blocks.3.mlp.png",
    ]
    assert json.loads(written[0].read_text()) == report
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written[1:])
