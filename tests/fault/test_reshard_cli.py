"""The reshard round trip from the CLI (issue 10): `moevit train` at EP=2 on 2 processes, `moevit ckpt
reshard` to EP=1, `moevit train --resume` on 1 process, reshard back to EP=2, resume on 2 processes.
(tests/distributed/test_reshard.py checks the numbers; this checks the commands and the client state.)
ZeRO 1/2 checkpoints are refused with a clear error.
"""

from __future__ import annotations

import json

import pytest
from fault_helpers import read_records, run_moevit, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def reshard(capsys, *args: str) -> str:
    """`moevit ckpt reshard ARGS` through the CLI's entry function, in this process (no launch needed)."""
    from moevit.cli import main

    assert main(["ckpt", "reshard", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def client_states(run_dir, step: int) -> list[dict]:
    directory = run_dir / "checkpoints" / f"step_{step:08d}" / "client_state"
    return [json.loads(path.read_text()) for path in sorted(directory.glob("rank_*.json"))]


@pytest.mark.timeout(400)
def test_train_ep2_reshard_to_ep1_resume_reshard_back_resume(synth_root, tmp_path, capsys, two_task_config):
    ep2, ep1, ep2_again = tmp_path / "ep2", tmp_path / "ep1", tmp_path / "ep2_again"
    config = write_config(tmp_path / "train.yaml", two_task_config(synth_root, ep2, steps=1))
    assert run_moevit("train", str(config), "--nproc", "2").returncode == 0

    summary = reshard(capsys, str(ep2), "--ep-size", "1", "--out", str(ep1))
    assert "(world size 2, ep_size 2)" in summary and "(world size 1, ep_size 1)" in summary
    (single,) = client_states(ep1, 1)
    # The 2 ranks had read 2 x 8 'shapes' samples of one permutation: the single rank continues after them.
    assert single["loader"]["tasks"]["shapes"]["sampler"] == {
        **client_states(ep2, 1)[0]["loader"]["tasks"]["shapes"]["sampler"],
        "position": 16,
        "world_size": 1,
    }

    overrides = ["parallel.ep_size=1", "train.steps=2", f"output_dir={ep1}"]
    done = run_moevit("train", str(config), *overrides, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 1" in done.stdout + done.stderr

    reshard(capsys, str(ep1), "--ep-size", "2", "--out", str(ep2_again))
    overrides = ["train.steps=3", f"output_dir={ep2_again}"]
    done = run_moevit("train", str(config), *overrides, "--nproc", "2", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 2" in done.stdout + done.stderr
    steps = [r["step"] for r in read_records(ep2_again) if r["split"] == "train" and r["task"] is None]
    assert steps == [3]  # a resharded run dir starts its own metrics at the resumed step
    assert len(client_states(ep2_again, 3)) == 2


def test_zero_1_and_2_checkpoints_are_refused(tmp_path, capsys):
    from moevit.cli import main

    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    marker = {"step": 2, "world_size": 2, "ep_size": 2, "zero_stage": 2}
    (checkpoint / "complete.json").write_text(json.dumps(marker))
    status = main(["ckpt", "reshard", str(checkpoint), "--ep-size", "1", "--out", str(tmp_path / "out")])
    assert status == 2
    assert "ZeRO stage 2" in capsys.readouterr().err and not (tmp_path / "out").exists()
