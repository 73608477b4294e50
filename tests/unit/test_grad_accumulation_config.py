"""train.grad_accum_steps from the config: validated, handed to DeepSpeed, counted in the epochs covered."""

import pytest

from moevit.config import load_config
from moevit.data.coverage import epochs_covered
from moevit.parallel.engine import deepspeed_config


def test_grad_accum_steps_reaches_deepspeed():
    cfg = load_config("configs/demo.yaml", ["train.grad_accum_steps=3"])
    assert deepspeed_config(cfg)["gradient_accumulation_steps"] == 3
    assert deepspeed_config(load_config("configs/demo.yaml"))["gradient_accumulation_steps"] == 1


def test_grad_accum_steps_below_one_is_refused_by_name():
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1, got 0"):
        load_config("configs/demo.yaml", ["train.grad_accum_steps=0"])


def test_each_accumulated_step_reads_g_micro_batches():
    one = load_config("configs/demo.yaml")
    three = load_config("configs/demo.yaml", ["train.grad_accum_steps=3"])
    sizes = {name: 1000 for name in one.tasks}
    for task, covered in epochs_covered(three, 2, sizes).items():
        assert covered.samples == 3 * epochs_covered(one, 2, sizes)[task].samples
