"""Expert usage read back from a run dir (moevit.artifacts.usage): the moving average summed over every
rank's client state; runs without one fall back to the last evaluation window."""

import json

import torch

from moevit.artifacts.usage import usage_from_run
from moevit.parallel.checkpoint import CLIENT_STATE_DIR, COMPLETE_FILE, checkpoint_root
from moevit.train.usage_plots import ExpertUsage

TAG = "step_00000004"


def write_checkpoint(run, client_states):
    directory = checkpoint_root(run) / TAG
    (directory / CLIENT_STATE_DIR).mkdir(parents=True)
    for rank, state in enumerate(client_states):
        (directory / CLIENT_STATE_DIR / f"rank_{rank:05d}.json").write_text(json.dumps(state))
    marker = {"step": 4, "world_size": len(client_states), "ep_size": 1}
    (directory / COMPLETE_FILE).write_text(json.dumps(marker))


def rank_usage(scale):
    usage = ExpertUsage(["a", "b"], ema_decay=0.5)
    for step in range(1, 3):
        usage.add(
            {
                "blocks.1.mlp": {
                    "a": torch.tensor([1, 0, 3]) * scale * step,
                    "b": torch.tensor([0, 2, 2]) * scale,
                },
                "blocks.1.attn": {"a": torch.tensor([5, 5]), "b": torch.tensor([5, 5])},
            }
        )
    return {"step": 4, "usage": usage.state_dict()}


def test_the_moving_average_is_summed_over_ranks(tmp_path):
    write_checkpoint(tmp_path, [rank_usage(1), rank_usage(10)])
    usage, origin = usage_from_run(tmp_path, TAG)
    # Per rank: 0.5 * first + 0.5 * second step; ranks add up. Attention experts are not pruned: left out.
    assert usage == {"blocks.1.mlp": {"a": [16.5, 0.0, 49.5], "b": [0.0, 22.0, 22.0]}}
    assert "moving average" in origin and "0.5" in origin


def test_a_run_without_the_average_falls_back_to_the_last_window(tmp_path):
    state = rank_usage(1)
    del state["usage"]["ema"]  # as checkpoints written before the average existed
    write_checkpoint(tmp_path, [state])
    plots = tmp_path / "plots"
    plots.mkdir()
    report = {"step": 2, "since_step": 0, "layers": {"blocks.1.mlp": {"a": [1, 1, 1], "b": [2, 0, 0]}}}
    (plots / "usage_step0000002.json").write_text(json.dumps(report))
    usage, origin = usage_from_run(tmp_path, TAG)
    # The report's window plus the checkpoint's counts not yet reported (steps 1-2 of rank_usage).
    assert usage == {"blocks.1.mlp": {"a": [4, 1, 10], "b": [2, 4, 4]}}
    assert "usage_step0000002.json" in origin and "client state" in origin
