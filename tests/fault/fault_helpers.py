"""Helpers of the fault-injection suite: `moevit` CLI runs that can be killed, and their records.

The small two-task config these runs train is the `two_task_config` fixture (conftest.py).

Runs go through the real entry point (`python -m moevit.cli`, what `moevit` runs) with torchrun
underneath for `--nproc 2`; every launch has a hard timeout and its whole process group is killed on
the way out, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from moevit.train.throughput import WALL_CLOCK_FIELDS

LAUNCH_TIMEOUT_S = 180


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def moevit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "moevit.cli", *args]


def run_moevit(*args: str, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT_S):
    """Runs `moevit ARGS` to the end in its own process group; returns the CompletedProcess."""
    process = subprocess.Popen(
        moevit_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"moevit {' '.join(args)} exceeded {timeout} s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launch and every process it started.

    The launcher's process group is not enough: torchrun starts each rank in a session of its own
    (torch.distributed.elastic's subprocess handler), so killing the group alone left the ranks and
    their DataLoader workers running, orphaned, holding their memory.
    """
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_logged_step(run_dir: Path) -> int:
    """The step of the newest train record in metrics.jsonl (0 if none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def kill_when_logged(args: list[str], run_dir: Path, step: int, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Starts `moevit ARGS`, waits until metrics.jsonl holds `step`, then SIGKILLs every process of it."""
    process = subprocess.Popen(
        moevit_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while last_logged_step(run_dir) < step:
            if process.poll() is not None:
                pytest.fail(
                    f"training exited ({process.returncode}) before step {step}:\n{process.stderr.read()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"training did not reach step {step} within {timeout} s")
            time.sleep(0.02)
    finally:
        kill_group(process)


def assert_one_line_error(stderr: str, what: str = "") -> str:
    """The refusal the CLI promises: a `moevit: error: ...` line (the same on every rank that prints it)
    and no traceback. Returns the message."""
    assert "Traceback" not in stderr, f"{what}: a traceback reached the user:\n{stderr[-4000:]}"
    messages = {line for line in stderr.splitlines() if line.startswith("moevit: error: ")}
    assert len(messages) == 1, (
        f"{what}: expected one 'moevit: error:' message, got {messages}\n{stderr[-4000:]}"
    )
    return messages.pop()


def comparable(records: list[dict]) -> list[dict]:
    """Records without the wall-clock speed fields, the only values two identical runs may differ in."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]


def final_weights(run_dir: Path, step: int) -> dict:
    """The single-device weights of the run's checkpoint at `step`."""
    from moevit.parallel.checkpoint import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}")
