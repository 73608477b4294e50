"""DataLoader worker set-up shared by training and evaluation."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's own exit handler first; see below
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


def _kill_workers_left_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic children (DataLoader workers) still running.

    multiprocessing's exit handler stops daemonic children with SIGTERM and then joins them. Workers
    set up by `ignore_stop_signals` ignore SIGTERM, so when a loader is still alive at exit (an error
    raised mid-iteration keeps its iterator in the traceback's frames) the process would wait for them
    forever. Registered after multiprocessing's handler, so it runs before it (atexit is last in,
    first out) and leaves it nothing to wait for. PyTorch's SIGCHLD handler would raise "DataLoader
    worker is killed" in the middle of this loop; the process is exiting, so the default comes back.
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


atexit.register(_kill_workers_left_at_exit)
