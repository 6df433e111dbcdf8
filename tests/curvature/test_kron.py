"""Kronecker curvatures (:mod:`cgfac.curvature.kron`): solve paths, factored damping,
eigendecompositions (their float64 retry and device reads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from host_reads import count_reads
from reference import Case, capture, dense_kron, double_model, factors, library_rows, unvec, vec
from torch import nn

import cgfac
from cgfac.curvature import eigh
from cgfac.curvature.kron import KronEigen, KronRows, factored_damping
from cgfac.solvers.pcg import cg


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 8),
                         nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def one_backward(model: nn.Module, step: int = 0) -> None:
    model.zero_grad()
    x, y = batch(step)
    F.cross_entropy(model(x), y).backward()


def test_eigendecomposition_retried_in_float64(monkeypatch) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cgfac.KFAC(model, kl_clip=None, damping=0.1)
    one_backward(model)
    pre.step()
    want = [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = net()
    pre = cgfac.KFAC(model, kl_clip=None, damping=0.1)
    one_backward(model)
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    pre.step()
    assert torch.float64 in calls and pre.fallbacks == 0
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)




DAMPING = 0.05


def gammas(a_f: torch.Tensor, g_f: torch.Tensor, damping: float) -> tuple[float, float]:
    pi = ((torch.trace(a_f) / a_f.shape[0]) / (torch.trace(g_f) / g_f.shape[0])).sqrt().item()
    return pi * damping**0.5, damping**0.5 / pi


def dense_factored(a_f: torch.Tensor, g_f: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """``((A + γ_A I) ⊗ (G + γ_G I))⁻¹ vec ∇W`` by ``torch.linalg.solve``."""
    gamma_a, gamma_g = gammas(a_f, g_f, damping)
    system = torch.kron(a_f + gamma_a * torch.eye(a_f.shape[0], dtype=a_f.dtype),
                        g_f + gamma_g * torch.eye(g_f.shape[0], dtype=g_f.dtype))
    return unvec(torch.linalg.solve(system, vec(grad)), grad.shape)


@pytest.mark.parametrize("rows", [3, 12], ids=["fewer-rows", "more-rows"])
def test_kron_paths_equal_dense_factored_solve(rows):
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 6, 4
    a = torch.randn(rows, d_in, generator=gen, dtype=torch.float64) * 2.0
    g = torch.randn(rows, d_out, generator=gen, dtype=torch.float64) * 0.3
    grad = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    op = KronRows(a, g)
    a_f, g_f = op.factors()
    want = dense_factored(a_f, g_f, grad, DAMPING)
    gamma_a, gamma_g = gammas(a_f, g_f, DAMPING)
    assert op.factored_damping(DAMPING) == pytest.approx((gamma_a, gamma_g), rel=1e-12)
    assert gamma_a / gamma_g != pytest.approx(1.0)  # π ≠ 1: the split matters in this case
    # The operator and its diagonal.
    v = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    dense = torch.kron(a_f + gamma_a * torch.eye(d_in, dtype=a.dtype), g_f + gamma_g * torch.eye(d_out, dtype=a.dtype))
    torch.testing.assert_close(op.matvec(v, DAMPING, form="factored"), unvec(dense @ vec(v), v.shape),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.jacobi(DAMPING, form="factored"), unvec(torch.diagonal(dense), v.shape),
                               rtol=1e-12, atol=1e-12)
    # Low-rank, eigen and CG.
    torch.testing.assert_close(op.solve_lowrank(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    eig = KronEigen.from_factors(a_f, g_f)
    torch.testing.assert_close(eig.solve(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    # Square-ish sides: the damped inverses are built once per λ and reused; another λ rebuilds them.
    assert eig._inverses is not None and eig._inverses[0] == DAMPING
    torch.testing.assert_close(eig.solve(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    grad2 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(eig.solve(grad2, DAMPING, form="factored"),
                               dense_factored(a_f, g_f, grad2, DAMPING), rtol=1e-9, atol=1e-10)
    for _ in range(2):
        torch.testing.assert_close(eig.solve(grad, 3 * DAMPING, form="factored"),
                                   dense_factored(a_f, g_f, grad, 3 * DAMPING), rtol=1e-9, atol=1e-10)
    assert eig._inverses[0] == 3 * DAMPING
    # Very unequal sides: the eigenbasis products, no inverses.
    wide = KronEigen.from_factors(torch.eye(40, dtype=torch.float64) + a_f.new_ones(40, 40) / 40, g_f[:2, :2])
    g_wide = torch.randn(2, 40, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(wide.solve(g_wide, DAMPING, form="factored"),
                               dense_factored(wide.q_a @ torch.diag(wide.s_a) @ wide.q_a.T, g_f[:2, :2], g_wide,
                                              DAMPING), rtol=1e-9, atol=1e-10)
    assert wide._inverses is None
    res = cg(lambda x: op.matvec(x, DAMPING, form="factored"), grad, max_iters=500, tol=1e-13,
             diag=op.jacobi(DAMPING, form="factored"))
    assert res.converged
    torch.testing.assert_close(res.x, want, rtol=1e-9, atol=1e-10)
    # The exact form is a different system.
    assert not torch.allclose(eig.solve(grad, DAMPING), want, rtol=1e-3)


def test_factored_damping_guards_zero_traces():
    assert factored_damping(0.0, 3, 2.0, 2, 4.0) == (2.0, 2.0)
    assert factored_damping(8.0, 2, 1.0, 1, 4.0) == pytest.approx((4.0, 1.0))


def test_eigh_reads_back_its_result_only_when_asked_to_check() -> None:
    m = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = m @ m.T
    with count_reads() as unchecked:
        s, q = eigh(m, check=False)
    with count_reads() as checked:
        s2, q2 = eigh(m)
    assert not unchecked and checked
    assert torch.equal(s, s2) and torch.equal(q, q2)


def test_kron_product_matches_torch_kron(case: Case) -> None:
    model = double_model(case)
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


@pytest.mark.parametrize("r_a,r_g", [(2, 3), (40, 50), (2, 60)])
def test_kron_product_orders(r_a: int, r_g: int) -> None:
    """Few rows take the ``r_g × r_a`` route, many rows the thin ``d_out × d_in`` one; both exact."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(r_a, 9, generator=gen, dtype=torch.float64)
    g = torch.randn(r_g, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    want = unvec(dense_kron(a.T @ a, g.T @ g) @ vec(v), v.shape) + 0.1 * v
    torch.testing.assert_close(KronRows(a, g).matvec(v, 0.1), want, rtol=1e-10, atol=1e-12)


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
