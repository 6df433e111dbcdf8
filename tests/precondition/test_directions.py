"""Every solve path against ``torch.linalg.solve`` on the dense damped system (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from preconditioners import PRECONDITIONERS, dense_directions, preconditioned_grads
from reference import (
    Case,
    cases,
)
from torch import nn

import cgfac

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", list(PRECONDITIONERS))
def test_direction_matches_dense_solve(case: Case, kind: str) -> None:
    torch.manual_seed(0)
    model = case.make_model().double()
    want = dense_directions(case, model, exact="exact" in kind)
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    got = preconditioned_grads(model)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)
        assert "fallback" not in pre.layer_stats()[name]
    if kind.endswith("-cg") or kind.endswith("nojacobi"):
        for st in pre.layer_stats().values():
            assert st["method"] == "cg" and st["converged"] and st["rel_residual"] <= 1e-13


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 7), d_out=st.integers(1, 6), n=st.integers(1, 9), bias=st.booleans(),
    log_damping=st.floats(-3, 1), seed=st.integers(0, 2**16),
    kind=st.sampled_from(["kfac", "cg", "lowrank", "eigen", "exact-cg", "exact-lowrank"]),
)
def test_property_direction_matches_dense_solve(d_in, d_out, n, bias, log_damping, seed, kind) -> None:
    torch.manual_seed(seed)
    damping = 10.0**log_damping
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    x, t = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    kw = {"damping": damping, "kl_clip": None}
    if kind == "kfac":
        pre = cgfac.KFAC(layer, factor_decay=0.0, inv_update_steps=1, **kw)
    elif kind.startswith("exact"):
        pre = cgfac.CGFAC(layer, curvature="exact", solver=kind[6:], cg_tol=1e-12, cg_max_iters=500, **kw)
    else:
        pre = cgfac.CGFAC(layer, solver=kind, cg_tol=1e-12, cg_max_iters=500, **kw)
    (0.5 * (layer(x) - t).pow(2).sum(1).mean()).backward()
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) if bias else x
    g = layer(x).detach() - t  # per-sample output gradients of the squared error
    grad = g.T @ a / n
    if kind.startswith("exact"):
        jac = torch.einsum("so,si->sio", g, a).reshape(n, -1)  # column-major vec of g_s a_sᵀ
        system = jac.T @ jac / n
    else:
        system = torch.kron(a.T @ a / n, g.T @ g / n)
    system += damping * torch.eye(system.shape[0], dtype=system.dtype)
    want = torch.linalg.solve(system, grad.T.reshape(-1)).reshape(a.shape[1], d_out).T
    pre.step()
    got = layer.weight.grad if not bias else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    if kind.endswith("cg"):  # CG stops at relative residual 1e-12: error ≤ κ · 1e-12 (κ reaches 1e8 here)
        kappa = float(torch.linalg.eigvalsh(system)[-1]) / damping
        assert float((got - want).norm()) <= max(kappa, 1e3) * 1e-12 * float(want.norm()) + 1e-14
    else:
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
