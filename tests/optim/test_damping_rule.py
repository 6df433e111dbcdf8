"""cgfac.optim.damping (the Levenberg–Marquardt rule) and cgfac.optim.quadratic.solve_coefficients:
the rule's thresholds, bounds and schedule, and the coefficients against a direct minimisation."""

from __future__ import annotations

import math

import pytest
import torch

from cgfac.optim.damping import LevenbergMarquardt
from cgfac.optim.quadratic import solve_coefficients

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


def test_coefficients_minimise_the_model() -> None:
    damped = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    lin = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    alpha, mu = solve_coefficients(damped, lin, "lr+momentum", True, 0.9) or (0.0, 0.0)
    c = torch.tensor([alpha, mu], dtype=torch.float64)
    torch.testing.assert_close(damped @ c + lin, torch.zeros(2, dtype=torch.float64), atol=1e-14, rtol=0)
    # α alone with μ fixed: ∂/∂α of ½cᵀMc + linᵀc = 0 at c = (α, 0.9)
    alpha, mu = solve_coefficients(damped, lin, "lr", True, 0.9) or (0.0, 0.0)
    assert mu == 0.9
    assert float(damped[0, 0] * alpha + damped[0, 1] * mu + lin[0]) == pytest.approx(0.0, abs=1e-14)
    alpha, mu = solve_coefficients(damped, lin, "lr+momentum", False, 0.9) or (0.0, 0.0)
    assert (alpha, mu) == (pytest.approx(0.5), 0.0)


def test_no_finite_minimum() -> None:
    lin = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert solve_coefficients(torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), lin, "lr", False,
                              0.0) is None
    assert solve_coefficients(torch.tensor([[math.nan, 0.0], [0.0, 1.0]], dtype=torch.float64), lin, "lr", False,
                              0.0) is None
