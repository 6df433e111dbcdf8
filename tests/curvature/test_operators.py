"""Curvature products and captured rows against dense references (float64)."""

from __future__ import annotations

import pytest
import torch
from reference import Case, capture, cases, dense_kron, exact_fisher, factors, per_sample_grads, unvec, vec

import cgfac
from cgfac.curvature.exact import ExactRows
from cgfac.curvature.kron import KronEigen, KronRows

CASES = cases()


def library_rows(case: Case, model: torch.nn.Module) -> dict:
    """Rows captured by the library's hooks on one forward/backward of the mean-reduced loss."""
    pre = cgfac.CGFAC(model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    rows = {name: pre._rows(helper) for name, helper in pre.layers.items()}
    pre.remove()
    return rows


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def make(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.make_model().double()


def test_captured_rows_match_reference(case: Case) -> None:
    model = make(case)
    ref = capture(case, model)
    rows = library_rows(case, model)
    for name, (a, g, n) in ref.items():
        assert rows[name].n == n
        torch.testing.assert_close(rows[name].a, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows[name].g, g, rtol=1e-10, atol=1e-12)


def test_kron_product_matches_torch_kron(case: Case) -> None:
    model = make(case)
    ref = capture(case, model)
    rows = library_rows(case, model)
    gen = torch.Generator().manual_seed(1)
    for name, (a, g, n) in ref.items():
        a_f, g_f = factors(a, g, n)
        op = KronRows.from_rows([rows[name]], [1.0])
        v = torch.randn(g.shape[1], a.shape[1], generator=gen, dtype=torch.float64)
        dense = dense_kron(a_f, g_f) @ vec(v) + 0.3 * vec(v)
        torch.testing.assert_close(op.matvec(v, 0.3), unvec(dense, v.shape), rtol=1e-10, atol=1e-12)
        a_x, g_x = op.factors()
        torch.testing.assert_close(a_x, a_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_x, g_f, rtol=1e-10, atol=1e-12)
        diag = torch.diagonal(dense_kron(a_f, g_f)) + 0.3
        torch.testing.assert_close(vec(op.jacobi(0.3)), diag, rtol=1e-10, atol=1e-12)


def test_exact_product_matches_per_sample_fisher(case: Case) -> None:
    model = make(case)
    jac = per_sample_grads(case, model)
    rows = library_rows(case, model)
    gen = torch.Generator().manual_seed(2)
    for name, j in jac.items():
        fisher = exact_fisher(j)
        op = ExactRows.from_rows([rows[name]], [1.0])
        v = torch.randn(j.shape[1], j.shape[2], generator=gen, dtype=torch.float64)
        dense = fisher @ vec(v) + 0.2 * vec(v)
        torch.testing.assert_close(op.matvec(v, 0.2), unvec(dense, v.shape), rtol=1e-10, atol=1e-12)
        diag = op.jacobi(0.2)
        if diag is not None:
            torch.testing.assert_close(vec(diag), torch.diagonal(fisher) + 0.2, rtol=1e-10, atol=1e-12)
        flat = j.transpose(1, 2).reshape(j.shape[0], -1)
        torch.testing.assert_close(op.gram(), flat @ flat.T / j.shape[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r_a,r_g", [(2, 3), (40, 50), (2, 60)])
def test_kron_product_orders(r_a: int, r_g: int) -> None:
    """Few rows take the ``r_g × r_a`` route, many rows the thin ``d_out × d_in`` one; both exact."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(r_a, 9, generator=gen, dtype=torch.float64)
    g = torch.randn(r_g, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    want = unvec(dense_kron(a.T @ a, g.T @ g) @ vec(v), v.shape) + 0.1 * v
    torch.testing.assert_close(KronRows(a, g).matvec(v, 0.1), want, rtol=1e-10, atol=1e-12)


def test_window_is_weighted_sum_of_batches() -> None:
    """A window of batches is the running average ``Σ_j w_j A_j``, ``Σ_j w_j G_j``, ``Σ_j w_j F_j``."""
    gen = torch.Generator().manual_seed(3)
    from cgfac.layers import Rows

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    batches = [Rows(rand(6, 4), rand(6, 3), 3), Rows(rand(10, 4), rand(10, 3), 5)]  # T = 2 rows/sample
    w = [0.25, 0.75]
    op = KronRows.from_rows(batches, w)
    a_f, g_f = op.factors()
    want_a = sum(wi * r.a.T @ r.a / r.a.shape[0] for r, wi in zip(batches, w))
    want_g = sum(wi * r.g.T @ r.g / r.n for r, wi in zip(batches, w))
    torch.testing.assert_close(a_f, want_a)
    torch.testing.assert_close(g_f, want_g)
    ex = ExactRows.from_rows(batches, w)
    fisher = 0
    for r, wi in zip(batches, w):
        j = torch.einsum("sto,sti->soi", r.g.reshape(r.n, 2, 3), r.a.reshape(r.n, 2, 4))
        fisher = fisher + wi * exact_fisher(j)
    v = rand(3, 4)
    torch.testing.assert_close(ex.matvec(v, 0.0), unvec(fisher @ vec(v), v.shape))


@pytest.mark.parametrize("through_samples", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(3, 2), (20, 20)])
def test_exact_gram_and_lowrank_routes(monkeypatch, through_samples: bool, d_in: int, d_out: int) -> None:
    """Samples of 3 rows: both routes to ``K`` (rows' Gram block sums, per-sample ``J``) are exact."""
    from cgfac.layers import Rows

    gen = torch.Generator().manual_seed(5)
    n, t = 4, 3
    rows = Rows(torch.randn(n * t, d_in, generator=gen, dtype=torch.float64),
                torch.randn(n * t, d_out, generator=gen, dtype=torch.float64), n)
    op = ExactRows.from_rows([rows], [1.0])
    monkeypatch.setattr(ExactRows, "gram_through_samples", lambda self: through_samples)
    j = torch.einsum("sto,sti->soi", rows.g.reshape(n, t, d_out), rows.a.reshape(n, t, d_in))
    fisher = exact_fisher(j)
    torch.testing.assert_close(op.per_sample(), j.reshape(n, -1) / n**0.5)
    flat = j.transpose(1, 2).reshape(n, -1)
    torch.testing.assert_close(op.gram(), flat @ flat.T / n)
    grad = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    system = fisher + 0.3 * torch.eye(d_in * d_out, dtype=torch.float64)
    want = unvec(torch.linalg.solve(system, vec(grad)), grad.shape)
    torch.testing.assert_close(op.solve_lowrank(grad, 0.3), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r_a,r_g", [(3, 50), (50, 3), (50, 60)])
def test_kron_lowrank_with_more_rows_than_width(r_a: int, r_g: int) -> None:
    """Each factor side uses min(r, d): QR of the rows or the explicit factor; both exact."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(r_a, 9, generator=gen, dtype=torch.float64)
    g = torch.randn(r_g, 7, generator=gen, dtype=torch.float64)
    grad = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    system = dense_kron(a.T @ a, g.T @ g) + 0.05 * torch.eye(63, dtype=torch.float64)
    want = unvec(torch.linalg.solve(system, vec(grad)), grad.shape)
    torch.testing.assert_close(KronRows(a, g).solve_lowrank(grad, 0.05), want, rtol=1e-9, atol=1e-12)


def test_float32_lowrank_is_as_accurate_as_eigen_when_ill_conditioned() -> None:
    """Rows with a dominant mean (like sigmoid activations): one huge Gram eigenvalue beside tiny
    ones. The low-rank solve keeps float32 accuracy: its basis ``aᵀV`` is never normalised (the
    normalised ``aᵀVσ^{-1/2}`` lost orthogonality and was worse than eigen here, 0.13 against 0.03)."""
    gen = torch.Generator().manual_seed(7)
    a = 0.5 + 0.05 * torch.randn(32, 64, generator=gen, dtype=torch.float64)
    g = torch.randn(40, 48, generator=gen, dtype=torch.float64) * torch.logspace(-1, 0.5, 48, dtype=torch.float64)
    grad = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    lam = 1e-2
    want = KronRows(a, g).solve_lowrank(grad, lam)
    system = dense_kron(a.T @ a, g.T @ g) + lam * torch.eye(64 * 48, dtype=torch.float64)
    torch.testing.assert_close(want, unvec(torch.linalg.solve(system, vec(grad)), grad.shape), rtol=1e-6, atol=1e-8)
    op32 = KronRows(a.float(), g.float())
    err_lowrank = float((op32.solve_lowrank(grad.float(), lam).double() - want).norm() / want.norm())
    err_eigen = float((KronEigen.from_factors(*op32.factors()).solve(grad.float(), lam).double() - want).norm()
                      / want.norm())
    assert err_lowrank <= 3 * err_eigen + 1e-5, (err_lowrank, err_eigen)


def _energy_error(x, want, big_a, big_g, lam: float) -> float:
    """``‖x − want‖_M / ‖want‖_M`` with ``M = A ⊗ G + λI`` (the matrices ``big_a``, ``big_g``)."""
    e = x.double() - want
    norm = lambda v: (v * (big_g @ v @ big_a + lam * v)).sum()  # noqa: E731
    return float((norm(e) / norm(want)).sqrt())


@pytest.mark.parametrize("kind", ["duplicates", "spread", "sigmoid"])
def test_float32_lowrank_with_a_singular_or_spread_gram(kind: str) -> None:
    """Rank-deficient rows (each repeated 4 times: exact zero eigenvalues of the Gram), rows whose
    norms spread over 6 decades, rows with a dominant mean. Error in the system's energy norm
    ``‖e‖_M / ‖x‖_M``, ``M = A ⊗ G + λI`` (the quadratic model's): the float32 low-rank solve within
    a tenth of the float32 eigen solve's (its Gram, eigh and basis run in float64), and the float64
    one within 1e-5 of the float64 eigen solve."""
    gen = torch.Generator().manual_seed(8)
    if kind == "duplicates":
        a = torch.randn(8, 60, generator=gen, dtype=torch.float64).repeat(4, 1)
    elif kind == "spread":
        spread = torch.logspace(-4, 2, 32, dtype=torch.float64)[:, None]
        a = torch.randn(32, 60, generator=gen, dtype=torch.float64) * spread
    else:
        a = 0.5 + 0.05 * torch.randn(32, 60, generator=gen, dtype=torch.float64)
    g = torch.randn(24, 40, generator=gen, dtype=torch.float64) * torch.logspace(-2, 0, 40, dtype=torch.float64)
    grad = torch.randn(40, 60, generator=gen, dtype=torch.float64)
    big_a, big_g = a.T @ a, g.T @ g
    for lam in (1e-3, 1e-1):
        want = KronEigen.from_factors(big_a, big_g).solve(grad, lam)

        op32 = KronRows(a.float(), g.float())
        err_lowrank = _energy_error(op32.solve_lowrank(grad.float(), lam), want, big_a, big_g, lam)
        err_eigen = _energy_error(KronEigen.from_factors(*op32.factors()).solve(grad.float(), lam), want, big_a, big_g,
                                  lam)
        assert err_lowrank <= 0.1 * err_eigen, (lam, err_lowrank, err_eigen)
        # float64 against float64 eigen: both within κ·ε of the truth (κ reaches 1e10 for "spread")
        assert _energy_error(KronRows(a, g).solve_lowrank(grad, lam), want, big_a, big_g, lam) < 1e-5
