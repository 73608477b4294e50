"""Stopping a training run cleanly on a signal: checkpoint at a step boundary, then exit (or requeue).

- SIGUSR2 (preemption; SLURM sends it `--signal=USR2@120` before the time limit, `scancel
  --signal=USR2 JOB` sends it by hand): checkpoint, then rank 0 runs `scontrol requeue
  $SLURM_JOB_ID`, and the requeued job resumes with `--resume auto`. USR2 because NCCL takes USR1.
- SIGTERM (scancel, the time limit, torchrun shutting down): checkpoint and exit, no requeue.

A handler only sets a flag, because a rank cannot stop on its own: the others would wait for it in
the next all-to-all. At every step boundary the ranks all-reduce their flags, so all of them see
the signal at the same step (even when it reached only some of them, or reached them at different
moments), save one checkpoint together and leave the loop. A signal that arrives while a checkpoint
is being written only sets the flag, so the save completes; a second SIGTERM kills at once (the
default action), and the commit protocol of moevit.parallel.checkpoint (complete.json, then an
atomic `latest`) keeps the previous checkpoint the one that is read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import torch

from moevit.parallel.collectives import all_reduce_sum, is_main_process

PREEMPT_SIGNAL = signal.SIGUSR2
TERMINATE_SIGNAL = signal.SIGTERM


def requeue_slurm_job(job_id: str) -> None:
    """Put the job back into the queue (slurmctld then ends this run: SIGTERM, later SIGKILL)."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)


class Preemption:
    """Signal flags set by handlers and agreed on by all ranks at step boundaries.

    Args:
        requeue: called by rank 0 with SLURM_JOB_ID after a preemption checkpoint (tests replace it).
    """

    def __init__(self, requeue: Callable[[str], None] = requeue_slurm_job):
        self._requeue = requeue
        self._received = {PREEMPT_SIGNAL: False, TERMINATE_SIGNAL: False}
        self._previous: dict[signal.Signals, object] = {}
        self.stopped: signal.Signals | None = None  # the signal the ranks agreed to stop on

    @classmethod
    def install(cls, requeue: Callable[[str], None] = requeue_slurm_job) -> Preemption:
        """Catch USR2 and SIGTERM in this process from now until `finish`.

        Outside the main thread (where Python cannot install handlers) nothing is caught.
        """
        preemption = cls(requeue)
        if threading.current_thread() is not threading.main_thread():
            return preemption
        for signum in preemption._received:
            preemption._previous[signum] = signal.signal(signum, preemption._handle)
        return preemption

    def _handle(self, signum: int, frame) -> None:
        signum = signal.Signals(signum)
        if signum == TERMINATE_SIGNAL and self._received[signum]:
            signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM: stop waiting for the step boundary
            os.kill(os.getpid(), signum)
        self._received[signum] = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank received USR2 or SIGTERM so far; every rank gets the same answer.

        Sets `stopped` (SIGTERM wins over USR2: a job being cancelled must not requeue itself).
        """
        flags = torch.tensor([float(v) for v in self._received.values()], device=device)
        preempt, terminate = (bool(v > 0) for v in all_reduce_sum(flags).tolist())
        if terminate:
            self.stopped = TERMINATE_SIGNAL
        elif preempt:
            self.stopped = PREEMPT_SIGNAL
        return self.stopped is not None

    def describe(self, step: int) -> str:
        action = "requeueing the job" if self._requeues() else "exiting"
        return f"{self.stopped.name} received: checkpoint at step {step} saved, {action}"

    def _requeues(self) -> bool:
        return self.stopped == PREEMPT_SIGNAL and "SLURM_JOB_ID" in os.environ

    def finish(self) -> None:
        """After the last checkpoint: rank 0 requeues the SLURM job if the ranks stopped on USR2.

        Call once every rank has saved (save_checkpoint ends with a barrier). SIGTERM is
        ignored after a requeue: the work is saved, and the SIGTERMs slurmctld sends next (one per
        step, and srun's) must not cut the exit short (SIGKILL follows after KillWait anyway).
        Otherwise the previous handlers come back.
        """
        if self._requeues():
            if is_main_process():
                job_id = os.environ["SLURM_JOB_ID"]
                try:
                    self._requeue(job_id)
                except (OSError, subprocess.CalledProcessError) as err:
                    detail = getattr(err, "stderr", "") or err
                    print(f"moevit: scontrol requeue {job_id} failed: {detail}", file=sys.stderr)
                    raise
            signal.signal(TERMINATE_SIGNAL, signal.SIG_IGN)
            return
        self.restore()

    def restore(self) -> None:
        """Puts the handlers back that were installed before; no requeue (also after an error in the loop)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
