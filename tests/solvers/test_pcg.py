"""Conjugate gradients against scipy, warm starts, and breakdown guards."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from cgfac.curvature.kron import KronRows
from cgfac.solvers.pcg import cg


def kron_problem(seed: int, r: int = 12, d_in: int = 9, d_out: int = 7):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, d_in, dtype=torch.float64)
    g = torch.randn(r, d_out, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return KronRows(a / r**0.5, g / r**0.5), b


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_cg_matches_scipy(jacobi: bool, k: int) -> None:
    """After ``k`` iterations our iterate and residual are scipy's."""
    op, b = kron_problem(0)
    damping = 0.01
    shape = b.shape
    n = b.numel()

    def mv(v: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(v).reshape(shape), damping).reshape(-1).numpy()

    diag = op.jacobi(damping)
    m = sla.LinearOperator((n, n), matvec=lambda v: v / diag.reshape(-1).numpy(), dtype=np.float64) if jacobi else None
    iterates: list[np.ndarray] = []
    sla.cg(sla.LinearOperator((n, n), matvec=mv, dtype=np.float64), b.reshape(-1).numpy(), x0=np.zeros(n), rtol=1e-300,
           atol=0.0, maxiter=k, M=m, callback=lambda xk: iterates.append(xk.copy()))
    assert len(iterates) == k
    bn = np.linalg.norm(b.reshape(-1).numpy())
    scipy_res = np.linalg.norm(b.reshape(-1).numpy() - mv(iterates[-1])) / bn
    res = cg(lambda v: op.matvec(v, damping), b, max_iters=k, tol=1e-300, diag=diag if jacobi else None)
    assert res.iters == k
    np.testing.assert_allclose(res.x.reshape(-1).numpy(), iterates[-1], rtol=1e-9, atol=1e-12)
    true_res = float(torch.linalg.vector_norm(b - op.matvec(res.x, damping)) / torch.linalg.vector_norm(b))
    assert res.rel_residual == pytest.approx(scipy_res, rel=1e-6)
    assert true_res == pytest.approx(scipy_res, rel=1e-6)


def test_cg_converges_to_solve() -> None:
    op, b = kron_problem(1)
    res = cg(lambda v: op.matvec(v, 0.01), b, max_iters=500, tol=1e-12, diag=op.jacobi(0.01))
    assert res.converged and res.breakdown is None and res.rel_residual <= 1e-12
    a_f, g_f = op.factors()
    dense = torch.kron(a_f, g_f) + 0.01 * torch.eye(b.numel(), dtype=b.dtype)
    want = torch.linalg.solve(dense, b.T.reshape(-1)).reshape(b.shape[1], b.shape[0]).T
    torch.testing.assert_close(res.x, want, rtol=1e-9, atol=1e-12)


def test_warm_start_needs_fewer_iterations_on_correlated_batches() -> None:
    """Along slowly changing rows and gradients, warm-started CG spends fewer iterations in total."""
    gen = torch.Generator().manual_seed(2)
    r, d_in, d_out, rho = 32, 40, 30, 0.99
    scale = torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64) * scale
    g = torch.randn(r, d_out, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    warm, cold, x_prev = 0, 0, None
    for _ in range(15):
        a = rho**0.5 * a + (1 - rho) ** 0.5 * torch.randn(r, d_in, generator=gen, dtype=torch.float64) * scale
        g = rho**0.5 * g + (1 - rho) ** 0.5 * torch.randn(r, d_out, generator=gen, dtype=torch.float64)
        b = rho**0.5 * b + (1 - rho) ** 0.5 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        op = KronRows(a / r**0.5, g / r**0.5)
        kw = {"max_iters": 1000, "tol": 1e-3, "diag": op.jacobi(0.1)}
        res_w = cg(lambda v, op=op: op.matvec(v, 0.1), b, x_prev, **kw)
        res_c = cg(lambda v, op=op: op.matvec(v, 0.1), b, None, **kw)
        assert res_w.converged and res_c.converged
        warm, cold, x_prev = warm + res_w.products, cold + res_c.products, res_w.x
    assert warm < 0.9 * cold


def test_zero_rhs_returns_zero() -> None:
    res = cg(lambda v: v, torch.zeros(3, 4), max_iters=5, tol=1e-6)
    assert res.iters == 0 and res.converged and torch.equal(res.x, torch.zeros(3, 4))


def test_indefinite_operator_stops_with_finite_iterate() -> None:
    """``pᵀAp ≤ 0`` stops CG without dividing by it; the returned iterate is finite."""
    b = torch.ones(2, 2, dtype=torch.float64)
    res = cg(lambda v: -v, b, max_iters=10, tol=1e-8)
    assert res.breakdown is not None and not res.converged
    assert torch.equal(res.x, torch.zeros_like(b)) and res.rel_residual == 1.0


def test_non_finite_product_keeps_last_finite_iterate() -> None:
    """A product that turns NaN mid-way stops CG; the last finite iterate is returned."""
    op, b = kron_problem(3)
    calls = {"n": 0}

    def apply(v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = op.matvec(v, 0.01)
        return out * float("nan") if calls["n"] == 4 else out

    res = cg(apply, b, max_iters=50, tol=1e-12)
    assert res.breakdown is not None and res.iters == 4
    clean = cg(lambda v: op.matvec(v, 0.01), b, max_iters=3, tol=1e-12)
    torch.testing.assert_close(res.x, clean.x)
    assert res.rel_residual == clean.rel_residual


def test_non_finite_warm_start_falls_back_to_cold() -> None:
    op, b = kron_problem(4)
    x0 = torch.full_like(b, float("nan"))
    res = cg(lambda v: op.matvec(v, 0.01), b, x0, max_iters=500, tol=1e-10)
    assert res.converged and torch.isfinite(res.x).all()


def test_non_finite_rhs_is_reported() -> None:
    b = torch.tensor([[1.0, float("inf")]])
    res = cg(lambda v: v, b, max_iters=5, tol=1e-6)
    assert res.breakdown == "non-finite right-hand side" and not res.converged
