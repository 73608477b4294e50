"""DataLoader workers leave SIGTERM/USR2 to the main process (scancel signals every process of a step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from moevit.data.workers import ignore_stop_signals


class SignalsItself(Dataset):
    """Each item first sends `signum` to the worker reading it, as scancel would."""

    def __init__(self, signum: int):
        self.signum = signum

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), self.signum)
        return torch.tensor(index)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_workers_ignore_stop_signals(signum):
    loader = DataLoader(
        SignalsItself(signum), batch_size=2, num_workers=1, worker_init_fn=ignore_stop_signals
    )
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]


def test_without_it_a_sigterm_kills_the_worker_and_the_read_fails():
    loader = DataLoader(SignalsItself(signal.SIGTERM), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        list(loader)


def test_a_process_that_fails_mid_iteration_exits_without_waiting_for_its_workers():
    """Workers ignore SIGTERM, which is how multiprocessing stops them at exit; an error raised while a
    loader is being read (its iterator still alive in the traceback) must not leave the process waiting
    for them forever (it did: the paper rehearsal hung after a failed step)."""
    program = textwrap.dedent(
        """
        import torch
        from torch.utils.data import DataLoader
        from moevit.data.workers import ignore_stop_signals

        loader = DataLoader(list(range(64)), batch_size=1, num_workers=2, worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        next(batches)
        raise RuntimeError("a failed step")
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "a failed step" in done.stderr
