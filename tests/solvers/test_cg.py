"""CG-FAC's solver choice follows the damping: a CG iteration count measured at another ``λ``
(more than a factor 2 away) is stale and re-probed; the warm start survives a change of ``λ``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cgfac
from cgfac.curvature.kron import KronRows
from cgfac.solvers import cost


def ill_conditioned() -> tuple[KronRows, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 20, dtype=torch.float64)
    g = torch.randn(12, 15, generator=gen, dtype=torch.float64)
    return KronRows(a, g), torch.randn(15, 20, generator=gen, dtype=torch.float64)


def test_damping_change_makes_the_cg_count_stale(monkeypatch):
    # CG predicted cost = its count; low-rank 3.5: CG loses with the measured count of 5.
    monkeypatch.setattr(cost, "kron_costs", lambda r_a, r_g, d_in, d_out, k, c: {"cg": float(k), "lowrank": 3.5,
                                                                                 "eigen": 100.0})
    op, grad = ill_conditioned()
    pre = cgfac.CGFAC(nn.Linear(20, 15), cg_tol=1e-10)
    pre.cost_constants = cost.CostConstants(1, 1, 1, 1, 0, 0)
    pre.last_iters[""], pre.iters_damping[""], pre.probed_at[""] = 5, 1e-2, 0
    pre.steps = 1  # no periodic probe due
    pre.solve_operator("", op, grad, 1.5e-2)  # within a factor 2: the count holds
    st = pre.layer_stats()[""]
    assert st["method"] == "lowrank" and "probe" not in st and "products" not in st
    pre.steps, pre.stats = 2, {}
    pre.solve_operator("", op, grad, 1e-3)  # λ shrunk 10×: CG is probed at once
    st = pre.layer_stats()[""]
    assert "damping moved from 0.01 to 0.001" in st["probe"] and st["products"] >= 1
    assert pre.iters_damping[""] == 1e-3 and pre.probed_at[""] == 2
    assert pre.last_iters[""] == (st["products"] if st["method"] == "cg" else pre.cg_max_iters + 1)
    pre.steps, pre.stats = 3, {}
    pre.solve_operator("", op, grad, 1e-3)  # measured at this λ now: no new probe
    assert "probe" not in pre.layer_stats()[""]
    # A λ grown 1000× (and a small curvature) makes CG cheap: the stale count is re-measured and
    # CG takes the step.
    easy = KronRows(torch.eye(20, dtype=torch.float64)[:12] * 1e-2, op.g * 1e-2)
    pre.steps, pre.stats = 4, {}
    x = pre.solve_operator("", easy, grad, 1.0)
    st = pre.layer_stats()[""]
    assert st["method"] == "cg" and st["converged"] and "damping moved" in st["probe"]
    torch.testing.assert_close(x, easy.solve_lowrank(grad, 1.0), rtol=1e-8, atol=1e-12)
    # Checkpoints keep the damping of the count.
    other = cgfac.CGFAC(nn.Linear(20, 15))
    state = pre.state_dict()
    assert state["layers"][""]["iters_damping"] == 1.0
    other.load_state_dict(state)
    assert other.iters_damping[""] == 1.0


@pytest.mark.parametrize("old,new", [(1e-1, 1e-2), (1e-2, 1e-1), (1e-1, 2e-2)])
def test_warm_start_survives_a_damping_change(old, new):
    gen = torch.Generator().manual_seed(2)
    op = KronRows(torch.randn(12, 20, generator=gen, dtype=torch.float64),
                  torch.randn(12, 15, generator=gen, dtype=torch.float64) * 0.3)
    grad = torch.randn(15, 20, generator=gen, dtype=torch.float64)
    grad2 = grad + 0.05 * torch.randn(15, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    warm = cgfac.CGFAC(nn.Linear(20, 15), solver="cg", cg_tol=1e-8, cg_max_iters=1000)
    warm.solve_operator("", op, grad, old)
    assert "" in warm.solutions
    x_warm = warm.solve_operator("", op, grad2, new)
    warm_st = warm.layer_stats()[""]
    cold = cgfac.CGFAC(nn.Linear(20, 15), solver="cg", cg_tol=1e-8, cg_max_iters=1000)
    x_cold = cold.solve_operator("", op, grad2, new)
    cold_st = cold.layer_stats()[""]
    assert warm_st["converged"] and cold_st["converged"]
    assert warm_st["products"] <= cold_st["products"]
    want = op.solve_lowrank(grad2, new)
    torch.testing.assert_close(x_warm, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_cold, want, rtol=1e-5, atol=1e-6)
