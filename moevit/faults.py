"""Fault-injection hooks for the reliability tests (tests/fault/), read from environment variables.

Inert unless a variable is set; production code calls them at the two points where a real fault would
strike, so the tests exercise the real code paths instead of stubs:

    MOEVIT_FAULT_NONFINITE_LOSS=RANK:STEP[-LAST][:nan|inf][,...]
        rank RANK's loss becomes NaN (or inf) at optimizer step STEP (1-based; through LAST if given).
    MOEVIT_FAULT_KILL_IN_CHECKPOINT=RANK:STEP
        rank RANK kills itself (SIGKILL) while saving the checkpoint of step STEP: after writing its
        own files, before the save is committed (complete.json, `latest`).
"""

from __future__ import annotations

import os
import signal

NONFINITE_LOSS = "MOEVIT_FAULT_NONFINITE_LOSS"
KILL_IN_CHECKPOINT = "MOEVIT_FAULT_KILL_IN_CHECKPOINT"


def _entries(variable: str) -> list[list[str]]:
    text = os.environ.get(variable, "").strip()
    entries = [item.strip().split(":") for item in text.split(",") if item.strip()]
    for fields in entries:
        if len(fields) < 2 or not fields[0].isdigit():
            raise ValueError(f"{variable}={text!r}: expected RANK:STEP entries, e.g. '1:3'")
    return entries


def injected_loss(rank: int, step: int) -> float | None:
    """NaN or inf when MOEVIT_FAULT_NONFINITE_LOSS names this rank and step, else None."""
    for fields in _entries(NONFINITE_LOSS):
        first, _, last = fields[1].partition("-")
        value = fields[2] if len(fields) > 2 else "nan"
        if value not in ("nan", "inf"):
            raise ValueError(f"{NONFINITE_LOSS}: value must be nan or inf, got {value!r}")
        if int(fields[0]) == rank and int(first) <= step <= int(last or first):
            return float(value)
    return None


def maybe_kill_in_checkpoint(rank: int, step: int) -> None:
    """SIGKILL this process when MOEVIT_FAULT_KILL_IN_CHECKPOINT names this rank and step."""
    if any(int(f[0]) == rank and int(f[1]) == step for f in _entries(KILL_IN_CHECKPOINT)):
        os.kill(os.getpid(), signal.SIGKILL)
