"""The note a resumed run logs when its LR schedule gives the steps already taken other lrs than the
checkpoint's run did (moevit.train.schedule_change): the README's exact-resume promise holds with the
same config; a longer `train.steps` is a continuation, and the run says so."""

from __future__ import annotations

import pytest

from moevit.config import build_config, save_config
from moevit.config.schema import Config
from moevit.train.schedule_change import read_train_section, schedule_change_note


def config(tiny_config, steps: int, warmup_steps: int = 15, **optim) -> Config:
    train = {"steps": steps, "optim": {"warmup_steps": warmup_steps, **optim}}
    return build_config(Config, tiny_config("data", datasets=["imagenet"], train=train))


@pytest.fixture
def checkpoint_run(tmp_path, tiny_config):
    """Writes a run dir's config.yaml with train.steps=20, warmup 15 (the README's tour) and returns
    its train section as the loop reads it."""

    def write(**optim):
        path = tmp_path / "config.yaml"
        save_config(config(tiny_config, 20, **optim), path)
        return read_train_section(path)

    return write


def test_the_same_config_needs_no_note(checkpoint_run, tiny_config):
    assert schedule_change_note(checkpoint_run(), config(tiny_config, 20), start_step=20) is None


def test_a_longer_run_resumed_inside_the_warmup_is_the_longer_run(checkpoint_run, tiny_config):
    # Steps 1-15 are warmup under both train.steps: the longer run would have taken the same lrs.
    assert schedule_change_note(checkpoint_run(), config(tiny_config, 40), start_step=15) is None


def test_a_longer_run_resumed_past_the_warmup_is_called_a_continuation(checkpoint_run, tiny_config):
    note = schedule_change_note(checkpoint_run(), config(tiny_config, 40), start_step=20)
    assert "train.steps 20 -> 40" in note and "steps 1-20 followed the old one" in note


def test_a_changed_lr_is_named(checkpoint_run, tiny_config):
    note = schedule_change_note(checkpoint_run(), config(tiny_config, 20, lr=5.0e-4), start_step=3)
    assert "train.optim.lr 0.001 -> 0.0005" in note and "train.steps" not in note


def test_no_config_of_the_checkpoint_run_means_nothing_to_compare(tmp_path, tiny_config):
    assert read_train_section(tmp_path / "missing.yaml") is None
    assert schedule_change_note(None, config(tiny_config, 40), start_step=20) is None
