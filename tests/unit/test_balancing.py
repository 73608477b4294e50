"""Loss balancers against hand-worked examples (static, Kendall uncertainty weighting, DWA)."""

import json
import math

import pytest

from moevit.config.schema import LossBalancingConfig
from moevit.train.balancing import (
    DynamicWeightAverage,
    StaticWeights,
    UncertaintyWeighting,
    build_balancer,
)


def _json_round_trip(state):
    return json.loads(json.dumps(state))


def test_static_weights_are_the_loss_weights_and_never_change():
    balancer = StaticWeights({"cls": 1.0, "det": 0.5})
    balancer.update({"cls": 3.0, "det": 9.0})
    assert balancer.weights() == {"cls": 1.0, "det": 0.5}


def test_uncertainty_starts_at_the_static_weights():
    assert UncertaintyWeighting({"a": 1.0, "b": 2.0}, lr=0.1).weights() == {"a": 1.0, "b": 2.0}


def test_uncertainty_first_adam_step_by_hand():
    # Objective exp(-s) w L + s at s = 0: gradient 1 - w L.
    # a: 1 - 1 * 3 = -2 -> Adam's first step moves s by lr against the sign: s_a = +0.1.
    # b: 1 - 2 * 0.5 = 0 -> no movement.
    balancer = UncertaintyWeighting({"a": 1.0, "b": 2.0}, lr=0.1)
    balancer.update({"a": 3.0, "b": 0.5})
    weights = balancer.weights()
    assert weights["a"] == pytest.approx(math.exp(-0.1), rel=1e-6)
    assert weights["b"] == pytest.approx(2.0, rel=1e-7)


def test_uncertainty_settles_at_the_inverse_of_the_scaled_loss():
    # For a constant loss L the minimiser is s = log(w L): the task weight w exp(-s) becomes 1 / L.
    balancer = UncertaintyWeighting({"a": 1.0, "b": 0.5}, lr=0.05)
    for _ in range(1500):
        balancer.update({"a": 4.0, "b": 0.2})
    weights = balancer.weights()
    assert weights["a"] == pytest.approx(1 / 4.0, rel=0.02)
    assert weights["b"] == pytest.approx(1 / 0.2, rel=0.02)


def test_uncertainty_leaves_a_task_that_did_not_train_untouched():
    balancer = UncertaintyWeighting({"a": 1.0, "b": 1.0}, lr=0.1)
    balancer.update({"a": 3.0, "b": 3.0})
    before = balancer.state_dict()
    balancer.update({"a": 5.0})
    after = balancer.state_dict()
    assert after["log_variances"]["b"] == before["log_variances"]["b"]
    assert after["adam"]["b"] == before["adam"]["b"]
    assert after["log_variances"]["a"] != before["log_variances"]["a"]


def test_uncertainty_resume_is_bit_identical():
    losses = [{"a": 2.0, "b": 0.7}, {"a": 1.5}, {"a": 1.2, "b": 0.6}, {"b": 0.4}, {"a": 0.9, "b": 0.5}]
    straight = UncertaintyWeighting({"a": 1.0, "b": 1.0}, lr=0.1)
    for step_losses in losses:
        straight.update(step_losses)
    first = UncertaintyWeighting({"a": 1.0, "b": 1.0}, lr=0.1)
    for step_losses in losses[:3]:
        first.update(step_losses)
    resumed = UncertaintyWeighting({"a": 1.0, "b": 1.0}, lr=0.1)
    resumed.load_state_dict(_json_round_trip(first.state_dict()))
    for step_losses in losses[3:]:
        resumed.update(step_losses)
    assert resumed.state_dict() == straight.state_dict()


def test_dwa_by_hand_one_step_windows():
    # T = 2, K = 2. Periods: (a 1, b 1) then (a .5, b 1) -> r = (.5, 1);
    # lambda_a = 2 e^.25 / (e^.25 + e^.5) = 2 / (1 + e^.25) = 0.875647, lambda_b = 2 - lambda_a = 1.124353.
    balancer = DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=1)
    balancer.update({"a": 1.0, "b": 1.0})
    assert balancer.weights() == {"a": 1.0, "b": 1.0}  # one period: no rate yet
    balancer.update({"a": 0.5, "b": 1.0})
    weights = balancer.weights()
    assert weights["a"] == pytest.approx(0.875647, abs=1e-6)
    assert weights["b"] == pytest.approx(1.124353, abs=1e-6)


def test_dwa_averages_over_the_window_and_scales_the_static_weights():
    # Window 2: period means (a 3, b 1) then (a 1.5, b 1) -> the same rates as above, times w_a = 2.
    balancer = DynamicWeightAverage({"a": 2.0, "b": 1.0}, temperature=2.0, window=2)
    for step_losses in [{"a": 2.0, "b": 1.0}, {"a": 4.0, "b": 1.0}, {"a": 1.0, "b": 0.5}]:
        balancer.update(step_losses)
        assert balancer.weights() == {"a": 2.0, "b": 1.0}
    balancer.update({"a": 2.0, "b": 1.5})
    weights = balancer.weights()
    assert weights["a"] == pytest.approx(2.0 * 0.875647, abs=1e-6)
    assert weights["b"] == pytest.approx(1.124353, abs=1e-6)


def test_dwa_task_missing_from_a_period_has_ratio_one():
    # b trains only in the second period: r = (a: 2/4 = .5, b: 1) -> the hand-worked factors above.
    balancer = DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=1)
    balancer.update({"a": 4.0})
    balancer.update({"a": 2.0, "b": 7.0})
    weights = balancer.weights()
    assert weights["a"] == pytest.approx(0.875647, abs=1e-6)
    assert weights["b"] == pytest.approx(1.124353, abs=1e-6)


def test_dwa_resume_is_bit_identical():
    losses = [{"a": 2.0, "b": 1.0}, {"a": 1.7}, {"a": 1.1, "b": 0.9}, {"b": 0.8}, {"a": 0.7, "b": 0.6}]
    straight = DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=2)
    for step_losses in losses:
        straight.update(step_losses)
    first = DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=2)
    for step_losses in losses[:3]:
        first.update(step_losses)
    resumed = DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=2)
    resumed.load_state_dict(_json_round_trip(first.state_dict()))
    for step_losses in losses[3:]:
        resumed.update(step_losses)
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.weights() == straight.weights()


def test_build_balancer_follows_the_config():
    weights = {"a": 1.0}
    assert build_balancer(LossBalancingConfig(), weights).method == "static"
    uncertainty = build_balancer(LossBalancingConfig(method="uncertainty", lr=0.5), weights)
    assert uncertainty.optimizer.param_groups[0]["lr"] == 0.5
    dwa = build_balancer(LossBalancingConfig(method="dwa", temperature=3.0, window=7), weights)
    assert (dwa.temperature, dwa.window) == (3.0, 7)


def test_state_of_another_method_or_task_set_is_refused():
    dwa_state = DynamicWeightAverage({"a": 1.0}, temperature=2.0, window=1).state_dict()
    with pytest.raises(ValueError, match="method 'dwa'.*'uncertainty'"):
        UncertaintyWeighting({"a": 1.0}, lr=0.1).load_state_dict(dwa_state)
    with pytest.raises(ValueError, match=r"tasks \['a'\].*\['a', 'b'\]"):
        DynamicWeightAverage({"a": 1.0, "b": 1.0}, temperature=2.0, window=1).load_state_dict(dwa_state)


def test_unknown_task_or_non_finite_loss_is_refused():
    balancer = StaticWeights({"a": 1.0})
    with pytest.raises(KeyError, match="unknown tasks"):
        balancer.update({"z": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        DynamicWeightAverage({"a": 1.0}, temperature=2.0, window=1).update({"a": math.nan})
