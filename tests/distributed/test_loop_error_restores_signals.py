"""An error inside the training loop leaves no signal handler of moevit's behind: a process that goes on
(a notebook, a test session, a sweep driver) keeps its own SIGTERM/USR2 handling."""

from __future__ import annotations

import os
import signal

import pytest
from test_train_resume import make_config

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.faults import NONFINITE_LOSS
from moevit.train.errors import NonFiniteLossError
from moevit.train.loop import run_training

pytestmark = [pytest.mark.distributed]


def failing_worker(config: dict) -> dict:
    """Runs a training whose loss is NaN from step 1 on; reports the handlers before and after."""

    def mine(signum, frame):  # the caller's own handler, to be found again afterwards
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGUSR2, mine)
    os.environ[NONFINITE_LOSS] = "0:1-100"
    try:
        run_training(build_config(Config, config))
    except NonFiniteLossError:
        raised = True
    else:
        raised = False
    return {
        "raised": raised,
        "sigterm_restored": signal.getsignal(signal.SIGTERM) is mine,
        "usr2_restored": signal.getsignal(signal.SIGUSR2) is mine,
    }


def test_an_error_in_the_loop_restores_the_previous_handlers(tmp_path, synth_root, tiny_config, run_workers):
    config = make_config(tiny_config, synth_root, tmp_path / "run", steps=5, sampling="all", num_workers=0)
    config["parallel"] = {"ep_size": 1}
    config["train"]["max_bad_steps"] = 2
    (result,) = run_workers(failing_worker, 1, 150, config=config)
    assert result == {"raised": True, "sigterm_restored": True, "usr2_restored": True}
