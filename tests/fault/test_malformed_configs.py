"""Malformed configurations through `moevit train` (issue 10): each is refused with a clear message
naming the problem (one `moevit: error:` line, no traceback) and exit 2, as
docs/fault-tolerance.md promises, before any process group starts, leaving no run directory.

The CLI runs in this process (`moevit.cli.main`, what the `moevit` script calls), so the whole table
costs one import; that no process group started is checked directly, and one case runs as a real
subprocess with `--nproc 2` to check the exit status and that torchrun was never launched.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml
from fault_helpers import assert_one_line_error

from moevit.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def base_config(tiny_config):
    """base_config(root) -> the valid config each case breaks: moevit_debug (4 experts per MoE layer,
    top-2) with one classification task on an empty ImageNet folder under `root`."""

    def build(root) -> dict:
        (root / "imagenet" / "train").mkdir(parents=True, exist_ok=True)
        return tiny_config(
            root,
            root / "run",
            datasets={"shapes": "imagenet"},
            batch_sizes={"shapes": 4},
            train={"log_every": None},  # not set: the schema's default
        )

    return build


def setting(*path_and_value):
    """A mutation that sets config[path...] = value."""
    *path, value = path_and_value

    def mutate(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return mutate


def deleting(*path):
    def mutate(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


# (case id, mutation of the base config, extra CLI arguments, text the error must contain)
CASES = [
    ("unknown top-level key", setting("epochs", 3), [], "unknown key 'epochs'"),
    ("unknown nested key", setting("model", "moe", "topk", 1), [], "did you mean 'top_k'"),
    ("wrong type", setting("train", "steps", "ten"), [], "'train.steps' must be int"),
    ("bool for an int", setting("train", "steps", True), [], "'train.steps' must be int"),
    ("negative learning rate", setting("train", "optim", "lr", -0.1), [], "lr must be > 0"),
    ("min_lr above lr", setting("train", "optim", "min_lr", 1.0), [], "min_lr must be in"),
    ("betas out of range", setting("train", "optim", "betas", [0.9, 1.5]), [], "betas must be"),
    ("zero steps", setting("train", "steps", 0), [], "steps must be >= 1"),
    ("negative max_bad_steps", setting("train", "max_bad_steps", -1), [], "max_bad_steps must be >= 0"),
    ("ZeRO stage 3", setting("parallel", "zero_stage", 3), [], "'parallel.zero_stage' must be one of"),
    ("ep_size not dividing world size", setting("parallel", "ep_size", 4), ["--nproc", "2"], "world size"),
    (
        "ep_size not dividing experts",
        setting("parallel", "ep_size", 3),
        ["--nproc", "3"],
        "number of experts",
    ),
    ("top_k above expert count", setting("model", "moe", "top_k", 8), [], "top_k"),
    ("zero experts", setting("model", "moe", "num_experts", 0), [], "num_experts must be >= 1"),
    ("unknown model", setting("model", "name", "moevit_huge"), [], "moevit_huge"),
    (
        "missing dataset path",
        setting("tasks", "shapes", "data", "root", "/nonexistent/imagenet"),
        [],
        "is not a directory",
    ),
    ("task without dataset", deleting("tasks", "shapes", "data"), [], "needs a dataset"),
    ("unknown head (task type)", setting("tasks", "shapes", "type", "depth"), [], "'tasks.shapes.type'"),
    ("unknown head option", setting("tasks", "shapes", "head_options", {"depth": 3}), [], "depth"),
    (
        "dataset format for another task type",
        setting("tasks", "shapes", "data", "format", "coco"),
        [],
        "serves detection",
    ),
    ("missing required key", deleting("tasks", "shapes", "num_classes"), [], "missing required key"),
    ("no tasks", setting("tasks", {}), [], "at least one task"),
    ("zero batch size", setting("tasks", "shapes", "data", "batch_size", 0), [], "batch_size"),
    (
        "sampling ratios naming an unknown task",
        setting("train", "sampling", {"strategy": "weighted", "ratios": {"shapez": 1.0}}),
        [],
        "shapez",
    ),
    ("nccl on a CPU machine", setting("parallel", "backend", "nccl"), [], "nccl needs CUDA"),
    ("negative aux loss", setting("aux_loss", "load_balance", -1.0), [], "load_balance must be >= 0"),
    ("bad override", None, ["train.steps"], "expected KEY=VALUE"),
    ("resume from a missing checkpoint", None, ["--resume", "/nonexistent/run"], "/nonexistent/run"),
]


@pytest.mark.parametrize("case, mutate, args, expected", CASES, ids=[case[0] for case in CASES])
def test_malformed_config_is_refused_before_anything_starts(
    tmp_path, capsys, base_config, case, mutate, args, expected
):
    config = copy.deepcopy(base_config(tmp_path))
    if mutate is not None:
        mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))

    try:
        status = main(["train", str(path), *args])
    except SystemExit as exit:  # argparse-level errors exit directly
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2, f"{case}: exit {status}, the README promises 2"
    assert expected in error, f"{case}: unclear error:\n{error}"
    assert_one_line_error(error, case)
    assert not dist.is_initialized(), f"{case}: a process group started"
    assert not (tmp_path / "run").exists(), f"{case}: left a run directory behind"


def test_duplicate_key_and_invalid_yaml_are_refused(tmp_path, capsys, base_config):
    good = yaml.safe_dump(base_config(tmp_path))
    for text, expected in [
        (good + "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("tasks: [\n", "invalid YAML"),
    ]:
        (tmp_path / "bad.yaml").write_text(text)
        assert main(["train", str(tmp_path / "bad.yaml")]) == 2
        error = capsys.readouterr().err
        assert expected in error
        assert_one_line_error(error, expected)
    assert not (tmp_path / "run").exists()


def test_refusal_exits_2_without_launching_workers(tmp_path, base_config):
    config = base_config(tmp_path)
    config["parallel"] = {"ep_size": 4}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "moevit.cli", "train", str(path), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 2
    assert "parallel.ep_size=4 does not divide the world size 2" in assert_one_line_error(done.stderr)
    assert "torch.distributed.run" not in done.stderr and "OMP_NUM_THREADS" not in done.stderr
    assert not (tmp_path / "run").exists()
