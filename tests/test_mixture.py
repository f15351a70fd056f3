"""Mixture weights and schedules: temperature, scalarization, UniMax, Cooldown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gristmill.selectors.mixture import (
    MixtureSchedule,
    cooldown_temperature,
    scalarization_weights,
    temperature_weights,
    token_shares,
    unimax_budget,
    unimax_weights,
)


def test_temperature_one_gives_natural_shares():
    tokens = np.array([700.0, 200.0, 100.0])
    np.testing.assert_allclose(temperature_weights(tokens, 1.0), [0.7, 0.2, 0.1])


def test_temperature_two_gives_square_roots_normalized():
    q = np.array([0.64, 0.36])
    # q^(1/2) = [0.8, 0.6] -> normalized [0.5714..., 0.4285...]
    np.testing.assert_allclose(temperature_weights(q, 2.0), [0.8 / 1.4, 0.6 / 1.4])


def test_temperature_to_infinity_gives_uniform():
    q = np.array([0.98, 0.019, 0.001])
    np.testing.assert_allclose(temperature_weights(q, math.inf), [1 / 3] * 3)
    np.testing.assert_allclose(temperature_weights(q, 1e6), [1 / 3] * 3, atol=1e-5)


def test_temperature_keeps_empty_domain_at_zero():
    assert temperature_weights([10.0, 0.0, 30.0], 5.0)[1] == 0.0


def test_temperature_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_weights([1.0, 2.0], 0.0)


def test_scalarization_weights_are_p_over_q_and_average_to_one():
    q = np.array([0.9, 0.1])
    p = np.array([0.6, 0.4])
    w = scalarization_weights(q, p)
    np.testing.assert_allclose(w, [0.6 / 0.9, 4.0])
    assert float(q @ w) == pytest.approx(1.0)


def test_unimax_hand_worked_example_caps_small_domains_and_meets_budget():
    # tokens 10, 100, 1000; budget 600; at most 2 epochs.
    # smallest: 600/3 = 200 > 2*10 -> 20; B = 580
    # middle:   580/2 = 290 > 2*100 -> 200; B = 380
    # largest:  380/1 = 380 <= 2000 -> 380
    alloc = unimax_budget([10, 100, 1000], budget=600, max_epochs=2)
    np.testing.assert_allclose(alloc, [20, 200, 380])
    assert alloc.sum() == pytest.approx(600)
    assert np.all(alloc <= 2 * np.array([10, 100, 1000]))
    np.testing.assert_allclose(unimax_weights([10, 100, 1000], 600, 2), [20 / 600, 200 / 600, 380 / 600])


def test_unimax_is_uniform_when_no_cap_binds():
    np.testing.assert_allclose(unimax_budget([1000, 500, 2000], 300, 1), [100, 100, 100])


def test_unimax_rejects_budget_beyond_epoch_cap():
    with pytest.raises(ValueError, match="exceeds max_epochs"):
        unimax_budget([10, 10], budget=100, max_epochs=2)


def test_cooldown_step_shape_switches_at_switch_point():
    t = cooldown_temperature([0, 49, 50, 99], 100, 5.0, 1.0, "step", switch=0.5)
    np.testing.assert_allclose(t, [5, 5, 1, 1])


def test_cooldown_linear_shape_values():
    # decay from step 20 to step 100: at 60 it is halfway.
    t = cooldown_temperature([0, 20, 60, 100], 100, 5.0, 1.0, "linear", switch=0.2)
    np.testing.assert_allclose(t, [5, 5, 3, 1])


def test_cooldown_cosine_shape_values():
    t = cooldown_temperature([0, 50, 75, 100], 100, 5.0, 1.0, "cosine", switch=0.5)
    np.testing.assert_allclose(t, [5, 5, 3, 1])
    # quarter of the decay: 1 + 4 * (1 + cos(pi/4)) / 2
    assert cooldown_temperature(62.5, 100, 5.0, 1.0, "cosine", 0.5) == pytest.approx(
        1 + 2 * (1 + math.cos(math.pi / 4)))


def test_cooldown_rejects_switch_out_of_range():
    with pytest.raises(ValueError, match="switch must be in"):
        cooldown_temperature(0, 100, 5.0, 1.0, "linear", switch=1.0)


def test_cooldown_schedule_weights_follow_temperature():
    tokens = [1000.0, 100.0, 10.0]
    s = MixtureSchedule.cooldown(["a", "b", "c"], tokens, total_steps=100, t_start=5, t_end=1,
                                 shape="step", switch=0.3)
    np.testing.assert_allclose(s.weights_at(0), temperature_weights(tokens, 5))
    np.testing.assert_allclose(s.weights_at(29), temperature_weights(tokens, 5))
    np.testing.assert_allclose(s.weights_at(30), token_shares(tokens))
    np.testing.assert_allclose(s.weights_at(10_000), token_shares(tokens))
    assert len(s.starts) == 2


def test_schedule_round_trips_through_json(tmp_path):
    s = MixtureSchedule.cooldown(["a", "b"], [90.0, 10.0], total_steps=50, shape="cosine")
    s.save(tmp_path / "schedule.json")
    t = MixtureSchedule.load(tmp_path / "schedule.json")
    assert t.domains == ["a", "b"] and t.total_steps == 50
    for step in (0, 24, 25, 37, 49):
        np.testing.assert_allclose(t.weights_at(step), s.weights_at(step))
        assert t.weights_at(step).sum() == pytest.approx(1.0)


def test_scalarization_schedule_samples_natural_and_carries_loss_weights():
    s = MixtureSchedule.scalarization(["a", "b"], [900.0, 100.0], temperature=5.0, total_steps=10)
    np.testing.assert_allclose(s.weights_at(3), [0.9, 0.1])
    p = temperature_weights([0.9, 0.1], 5.0)
    assert s.loss_weights == pytest.approx({"a": p[0] / 0.9, "b": p[1] / 0.1})


def test_schedule_rejects_weights_of_wrong_length():
    with pytest.raises(ValueError, match="weights has shape"):
        MixtureSchedule.constant(["a", "b"], [1.0, 2.0, 3.0], total_steps=5)


def test_mean_weights_average_over_segments():
    s = MixtureSchedule(["a", "b"], 100, [0, 25], np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(s.mean_weights(), [0.25, 0.75])
