"""Spawning gloo process groups for tests, with hard timeouts.

`run_workers(target, world_size, timeout_s, **kwargs)` starts `world_size` fresh Python
processes with torchrun's environment variables on a free port, runs the module-level function
`target(**kwargs)` in each (defined in a test file) and returns the per-rank return values. A
rank that fails stops the others at once; a run that exceeds `timeout_s` is killed. Either way
the test fails with the tail of every rank's log, instead of hanging CI.

moevit.parallel.setup keeps DeepSpeed from JIT-compiling its CPU inference op (~100 s on a fresh
machine), so a timed run measures only the test.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_worker.py")
# Lets test files (imported by pytest with --import-mode=importlib) import engine_fixtures.
sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tails(logs: list[Path], lines: int = 40) -> str:
    parts = []
    for rank, log in enumerate(logs):
        text = log.read_text(errors="replace").splitlines() if log.exists() else []
        parts.append(f"--- rank {rank} (last {lines} lines of {log}) ---\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


def _launch(target, world_size: int, timeout_s: float, workdir: Path, kwargs: dict) -> list:
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs_path = workdir / "kwargs.pt"
    torch.save(kwargs, kwargs_path)
    port = _free_port()
    procs, logs, results = [], [], []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        log = workdir / f"rank_{rank}.log"
        result = workdir / f"result_{rank}.pt"
        command = [
            sys.executable,
            str(WORKER),
            inspect.getfile(target),
            target.__name__,
            str(kwargs_path),
            str(result),
        ]
        with open(log, "w") as handle:
            procs.append(subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT))
        logs.append(log)
        results.append(result)
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                pytest.fail(f"rank(s) {failed} of {target.__name__} failed\n{_log_tails(logs)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{target.__name__} exceeded its {timeout_s:.0f} s limit (hang?)\n{_log_tails(logs)}"
                )
            time.sleep(0.05)
        failed = [rank for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            pytest.fail(f"rank(s) {failed} of {target.__name__} failed\n{_log_tails(logs)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(path, weights_only=False) for path in results]


@pytest.fixture(scope="session")
def run_workers(tmp_path_factory):
    """run_workers(target, world_size=2, timeout_s=120, **kwargs) -> [result of rank 0, rank 1, ...]."""

    def run(target, world_size: int = 2, timeout_s: float = 120, **kwargs) -> list:
        return _launch(target, world_size, timeout_s, tmp_path_factory.mktemp(target.__name__), kwargs)

    return run
