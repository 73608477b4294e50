"""`moevit train` / `moevit eval` refuse bad input before any process or process group starts."""

import pytest
import yaml

from moevit.cli import main as moevit_main
from moevit.cli import train as cli


def write_config(tmp_path, **changes):
    (tmp_path / "imagenet").mkdir(exist_ok=True)
    config = {
        "model": {"name": "moevit_debug"},  # 4 experts
        "tasks": {
            "shapes": {
                "type": "classification",
                "num_classes": 3,
                "data": {"format": "imagenet", "root": str(tmp_path / "imagenet"), "image_size": 32},
            }
        },
        "output_dir": str(tmp_path / "run"),
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_relaunch(monkeypatch):
    """Fails the test if the command tries to start worker processes."""

    def refuse(argv, nproc):
        raise AssertionError(f"launched {nproc} workers with {argv}")

    monkeypatch.setattr(cli, "_relaunch", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    code = moevit_main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, overrides, message",
    [
        ({"train.stepz": 3}, [], "unknown key 'train.stepz' (did you mean 'steps'?)"),
        ({}, ["train.steps=many"], "'train.steps' must be int"),
        ({"parallel.ep_size": 3}, [], "parallel.ep_size=3 does not divide the world size 2"),
        ({"parallel.ep_size": 2, "model.moe.num_experts": 3}, [], "parallel.ep_size=2 does not divide"),
        ({"model.moe.top_k": 5}, [], "top_k"),
        ({"tasks.shapes.data": None}, [], "'tasks.shapes.data'"),
    ],
)
def test_bad_config_is_refused_and_nothing_is_written(
    tmp_path, capsys, no_relaunch, changes, overrides, message
):
    config = write_config(tmp_path, **changes)
    code, err = run_cli(["train", str(config), *overrides, "--nproc", "2"], capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "run").exists()


def test_fresh_run_into_a_run_with_checkpoints_is_refused(tmp_path, capsys, no_relaunch):
    config = write_config(tmp_path)
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    code, err = run_cli(["train", str(config), "--nproc", "2"], capsys)
    assert code == 2 and "--resume auto" in err


def test_eval_of_a_missing_checkpoint_is_refused(tmp_path, capsys, no_relaunch):
    config = write_config(tmp_path)
    code, err = run_cli(
        ["eval", str(config), "--checkpoint", str(tmp_path / "nowhere"), "--nproc", "2"], capsys
    )
    assert code == 2 and "--checkpoint" in err and "nowhere" in err


def test_a_good_config_is_relaunched_under_torchrun(tmp_path, monkeypatch):
    config = write_config(tmp_path, **{"parallel.ep_size": 2})
    launched = []
    monkeypatch.setattr(cli, "_relaunch", lambda argv, nproc: launched.append((argv, nproc)) or 0)
    assert moevit_main(["train", str(config), "train.steps=4", "--nproc", "2", "--resume", "auto"]) == 0
    assert launched == [(["train", str(config), "train.steps=4", "--resume", "auto"], 2)]
    assert not (tmp_path / "run").exists()  # the workers create the run dir, not the launcher


@pytest.mark.parametrize("worker_exit, expected", [(3, 3), (2, 2), (-9, 137)])
def test_local_launch_exits_with_the_failed_workers_code(monkeypatch, worker_exit, expected):
    """torchrun itself exits 1 with a traceback when a worker fails; `--nproc N` must pass on the worker's
    code (2: refused input, 3: non-finite stop; a signal as a shell reports it)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from moevit.cli import local_launch

    def fail(args):
        raise ChildFailedError("moevit.cli", {1: ProcessFailure(1, 123, worker_exit, "<N/A>")})

    monkeypatch.setattr(torchrun, "run", fail)
    assert (
        local_launch.main(["--standalone", "--nproc-per-node=2", "-m", "moevit.cli", "train", "x"])
        == expected
    )
    monkeypatch.setattr(torchrun, "run", lambda args: None)
    assert local_launch.main(["--standalone", "--nproc-per-node=2", "-m", "moevit.cli", "train", "x"]) == 0
