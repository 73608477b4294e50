"""DataLoader worker set-up shared by training and evaluation."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn`: workers ignore SIGTERM and SIGUSR2; the main process acts on them
    (moevit.train.preemption: checkpoint, then exit or requeue).

    scancel and SLURM's time limit signal every process of the job step, DataLoader workers included.
    PyTorch's worker handler lets a SIGTERM that does not come from the parent kill the worker, and the
    main process then fails on the dead worker at its next batch instead of checkpointing. Ignored, the
    signal leaves the worker to the main process's own shutdown (and to PyTorch's parent-death watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
