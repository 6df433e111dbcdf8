"""Kronecker curvatures (:mod:`cgfac.curvature.kron`): solve paths, factored damping,
eigendecompositions (their float64 retry and device reads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from host_reads import count_reads
from reference import unvec, vec
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
