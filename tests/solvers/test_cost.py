"""The cost model (:mod:`cgfac.solvers.cost`): ties and choices."""

from __future__ import annotations

import pytest


def test_cost_tie_goes_to_eigen_when_rows_outnumber_both_widths() -> None:
    """With r ≥ d on both sides the low-rank route is eigen plus arithmetic: equal costs, eigen."""
    from cgfac.solvers import cost

    c = cost.CostConstants(9.0, 4.0, 6.0, 1.1, 4e6, 8e6)
    for r_a, r_g, d_in, d_out in [(100352, 100352, 26, 16), (1000, 1000, 501, 1000)]:
        costs = cost.kron_costs(r_a, r_g, d_in, d_out, 10**6, c)
        assert costs["eigen"] == pytest.approx(costs["lowrank"], rel=1e-12)
        assert cost.choose(costs) == "eigen"
    assert cost.choose(cost.kron_costs(64, 64, 1000, 1000, 10**6, c)) == "lowrank"
