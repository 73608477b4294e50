"""Signal flags of moevit.train.preemption in one process: which signal stops, who requeues, what is restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from moevit.train.preemption import Preemption

CPU = torch.device("cpu")


@pytest.fixture
def requeued(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    calls: list[str] = []
    preemption = Preemption.install(requeue=calls.append)
    yield preemption, calls
    preemption._received = dict.fromkeys(preemption._received, False)
    for signum, handler in preemption._previous.items():  # whatever finish left installed
        signal.signal(signum, handler)


def test_no_signal_no_stop_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    preemption = Preemption.install(requeue=lambda job: pytest.fail("requeued without a signal"))
    assert signal.getsignal(signal.SIGTERM) != before[0]
    assert not preemption.agreed(CPU) and preemption.stopped is None
    preemption.finish()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == before


def test_usr2_stops_and_rank0_requeues_the_slurm_job(requeued):
    preemption, calls = requeued
    os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before the next bytecode: process survives
    assert preemption.agreed(CPU) and preemption.stopped == signal.SIGUSR2
    assert preemption.describe(7) == "SIGUSR2 received: checkpoint at step 7 saved, requeueing the job"
    preemption.finish()
    assert calls == ["4242"]
    # Ignored from now on: the SIGTERM slurmctld sends after the requeue must not cut the exit short.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_without_requeue_even_after_usr2(requeued):
    preemption, calls = requeued
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.agreed(CPU) and preemption.stopped == signal.SIGTERM
    assert preemption.describe(3).endswith("exiting")
    preemption.finish()
    assert calls == []


def test_usr2_outside_slurm_checkpoints_and_exits(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # Whatever handled USR2 before (in a full pytest session, possibly not SIG_DFL) is restored.
    previous = signal.getsignal(signal.SIGUSR2)
    preemption = Preemption.install(requeue=lambda job: pytest.fail("no SLURM job to requeue"))
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.agreed(CPU)
    assert preemption.describe(1).endswith("exiting")
    preemption.finish()
    assert signal.getsignal(signal.SIGUSR2) == previous


def test_a_second_sigterm_kills_at_once():
    code = (
        "import os, signal, time\n"
        "from moevit.train.preemption import Preemption\n"
        "Preemption.install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('survived the first', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('survived the second', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "survived the first" in done.stdout and "survived the second" not in done.stdout
