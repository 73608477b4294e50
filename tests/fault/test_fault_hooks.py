"""The fault-injection hooks themselves (moevit.faults): inert by default, exact about rank and step."""

import pytest

from moevit.faults import KILL_IN_CHECKPOINT, NONFINITE_LOSS, injected_loss, maybe_kill_in_checkpoint


def test_hooks_are_inert_without_their_variables(monkeypatch):
    monkeypatch.delenv(NONFINITE_LOSS, raising=False)
    monkeypatch.delenv(KILL_IN_CHECKPOINT, raising=False)
    assert injected_loss(0, 1) is None
    maybe_kill_in_checkpoint(0, 1)  # still alive


def test_nonfinite_loss_names_rank_step_range_and_value(monkeypatch):
    monkeypatch.setenv(NONFINITE_LOSS, "1:2, 0:4-6:inf")
    assert injected_loss(1, 2) != injected_loss(1, 2)  # NaN
    assert injected_loss(0, 2) is None and injected_loss(1, 3) is None
    assert [injected_loss(0, step) for step in (3, 4, 5, 6, 7)] == [
        None,
        float("inf"),
        float("inf"),
        float("inf"),
        None,
    ]


@pytest.mark.parametrize("value", ["2", "a:1", "1:2:zero"])
def test_malformed_hook_values_are_refused(monkeypatch, value):
    monkeypatch.setenv(NONFINITE_LOSS, value)
    with pytest.raises(ValueError, match=NONFINITE_LOSS):
        injected_loss(0, 1)
