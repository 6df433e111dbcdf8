"""The Levenberg–Marquardt rule (:mod:`cgfac.optim.damping`): its thresholds, bounds and schedule."""

from __future__ import annotations

import math

import pytest

from cgfac.optim.damping import LevenbergMarquardt

RULE = LevenbergMarquardt(interval=5, decay=0.95, low=1e-3, high=10.0)


def test_omega_and_schedule() -> None:
    assert RULE.omega == pytest.approx(0.95**5, rel=1e-15)
    assert [s for s in range(12) if RULE.due(s)] == [4, 9]


@pytest.mark.parametrize(("rho", "factor"), [(0.1, 1 / 0.95**5), (-2.0, 1 / 0.95**5), (math.nan, 1 / 0.95**5),
                                             (-math.inf, 1 / 0.95**5), (0.5, 1.0), (0.9, 0.95**5)])
def test_reduction_ratio_moves_damping(rho: float, factor: float) -> None:
    assert RULE.adapted(0.1, rho) == pytest.approx(0.1 * factor, rel=1e-14)


def test_damping_stays_in_its_range() -> None:
    assert RULE.adapted(9.9, 0.0) == 10.0
    assert RULE.adapted(1.0001e-3, 1.0) == 1e-3
    assert RULE.raised(9.9) == 10.0


def test_ratio() -> None:
    assert LevenbergMarquardt.ratio(0.8, 1.0, -0.4) == pytest.approx(0.5)
    assert LevenbergMarquardt.ratio(0.8, 1.0, 0.1) == -math.inf
    assert LevenbergMarquardt.ratio(0.8, 1.0, None) == -math.inf
