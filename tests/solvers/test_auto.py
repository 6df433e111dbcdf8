"""The automatic choice (:mod:`cgfac.solvers.auto`): CG's bounded probe and its fallback, and no
warm-start copy kept where CG cannot win."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cgfac
from cgfac.solvers import CG_PROBE_STEPS


def test_cg_probe_is_bounded_and_falls_back_to_the_cheaper_method(monkeypatch) -> None:
    """Auto predicts lowrank; CG could win within 3 products, so it is probed with that budget.
    An ill-conditioned layer does not converge: lowrank solves the step, CG is marked as losing."""
    from cgfac.curvature.kron import KronRows
    from cgfac.solvers import cost

    monkeypatch.setattr(cost, "kron_costs", lambda r_a, r_g, d_in, d_out, k, c: {"cg": float(k), "lowrank": 3.5,
                                                                                 "eigen": 100.0})
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 20, dtype=torch.float64)
    g = torch.randn(12, 15, generator=gen, dtype=torch.float64)
    op, grad = KronRows(a, g), torch.randn(15, 20, generator=gen, dtype=torch.float64)
    pre = cgfac.CGFAC(nn.Linear(20, 15), cg_tol=1e-10)
    pre.solutions["w"] = torch.zeros_like(grad)
    pre.cost_constants = cost.CostConstants(1, 1, 1, 1, 0, 0)
    x = pre.solve_operator("w", op, grad, 1e-3)
    st = pre.layer_stats()["w"]
    assert st["method"] == "lowrank" and st["products"] == 3 and "not converged" in st["probe"]
    torch.testing.assert_close(x, op.solve_lowrank(grad, 1e-3))
    assert pre.last_iters["w"] == pre.cg_max_iters + 1
    pre.steps = 1  # no new probe before CG_PROBE_STEPS steps
    pre.stats.clear()  # as step() does
    pre.solve_operator("w", op, grad, 1e-3)
    assert pre.layer_stats()["w"]["method"] == "lowrank" and "probe" not in pre.layer_stats()["w"]
    # A well-conditioned layer converges within the budget: CG keeps the step.
    assert "w" not in pre.solutions  # no CG due next step: no warm start kept
    pre.steps = 1000
    pre.stats.clear()
    pre.solutions["w"] = torch.zeros_like(grad)  # kept by step 999, the step before a due probe
    easy = KronRows(torch.eye(20, dtype=torch.float64)[:12] * 1e-3, g * 1e-3)
    pre.solve_operator("w", easy, grad, 1.0)
    assert pre.layer_stats()["w"]["method"] == "cg" and pre.layer_stats()["w"]["converged"]


@pytest.mark.parametrize(("o_iter", "copy_kept"), [(3e7, False), (1e5, True)])
def test_no_warm_start_copy_where_cg_cannot_win(o_iter: float, copy_kept: bool) -> None:
    """Wide layer, few rows: where no CG solve or probe could win (each CG product's overhead too
    large) the automatic choice solves by low rank and keeps no d_out × d_in copy, even at the steps
    where a periodic probe would be due; where CG can win (small overhead), the copy is kept for it. The
    cost constants are fixed: measured, this layer sits near the break-even on a 2-core CPU and the
    outcome would follow the load."""
    from cgfac.solvers.base import CostConstants

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 300))
    pre = cgfac.CGFAC(model, curvature_samples=4, kl_clip=None)
    pre.cost_constants = CostConstants(c_eig=15.3, c_solve=3.33, c_qr=18.4, thin=1.33, o_iter=o_iter, o_call=2.75e7)
    x = torch.randn(16, 300)
    for _ in range(CG_PROBE_STEPS + 2):
        model.zero_grad()
        (model(x) - x).pow(2).sum(1).mean().backward()
        pre.step()
        if not copy_kept:
            assert all(st.solver.solution is None for st in pre.states.values())
    assert all((st.solver.solution is not None) == copy_kept for st in pre.states.values())
    if not copy_kept:
        assert {st["method"] for st in pre.layer_stats().values()} == {"lowrank"}
