"""The transformer optimizer's factors (:mod:`cgfac.optim.transformer_factors`): damped powers, their
Cholesky and eigendecomposition forms, and the low-rank running factor, against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from cgfac.optim.transformer_factors import Side, lowrank_power, lowrank_running_factor
from cgfac.optim.transformer_kfac import (
    damped_cholesky,
    damped_power,
    factor_from_cholesky,
    factor_from_power,
    power_matrix,
)

torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_power(f: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """``(F + λI)^p`` by the dense eigendecomposition of ``F + λI``."""
    s, q = torch.linalg.eigh(f + lam * torch.eye(f.shape[0], dtype=f.dtype))
    return (q * s.pow(p)) @ q.T


@pytest.mark.parametrize("rows", [3, 20])  # low rank (r < d) and full rank
@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25])
def test_damped_power_matches_the_dense_matrix_power(rows: int, p: float) -> None:
    """``(F + λI)^p`` from the rows' low-rank eigensystem (QR route) and from the dense eigh of F,
    applied on both sides, against the dense power, λ = damping·tr(F)/d."""
    from cgfac.curvature.kron import factor_eig

    d, damping = 8, 0.05
    x = torch.randn(rows, d, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    f = x.T @ x / rows
    lam = damping * float(torch.trace(f)) / d
    want = dense_power(f, lam, p)
    m = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    s, q = factor_eig(x / math.sqrt(rows))
    low = Side.lowrank(*damped_power(s, q, damping, d, p))
    torch.testing.assert_close(low.right(m), m @ want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(low.left(m.T), want @ m.T, rtol=1e-9, atol=1e-11)
    s2, q2 = torch.linalg.eigh(f)
    full = Side.power(*damped_power(s2.clamp_min(0), q2, damping, d, p))
    torch.testing.assert_close(full.right(m), m @ want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25])
def test_factor_from_power_recovers_the_factor(p: float) -> None:
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(9, 6, generator=g, dtype=torch.float64)
    f = rows.T @ rows / 9
    s = torch.linalg.eigvalsh(f)
    damping = 0.03
    p_matrix = dense_power(f, damping * float(s.sum()) / 6, p)
    torch.testing.assert_close(factor_from_power(p_matrix, damping, p), f, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("rows", [3, 20])  # rank-deficient and full-rank factors
@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25])
def test_power_matrix_and_its_inverse_against_the_dense_power(rows: int, p: float) -> None:
    """``power_matrix`` (Cholesky for p = −1, eigh otherwise) is the dense ``(F + λI)^p``, λ = damping·tr(F)/d,
    and ``factor_from_power`` (Cholesky for p = −1, −1/2) gives ``F`` back, rank-deficient ``F`` included."""
    d, damping = 8, 0.05
    x = torch.randn(rows, d, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    f = x.T @ x / rows
    want = dense_power(f, damping * float(torch.trace(f)) / d, p)
    got = power_matrix(f, damping, p)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(factor_from_power(got, damping, p), f, rtol=1e-8, atol=1e-10)


def test_power_matrix_falls_back_to_eigh_where_cholesky_fails() -> None:
    """A factor Cholesky cannot take (an indefinite input here, by construction) goes through the
    eigendecomposition path, whose eigenvalues are clamped at 0: the result is the clamped factor's power,
    not a silent failure."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    s = torch.tensor([-3.0, 0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    f = (q * s) @ q.T  # F + λI is indefinite for λ = 0.01·tr(F)/5
    clamped = (q * s.clamp_min(0)) @ q.T
    want = dense_power(clamped, 0.01 * float(s.clamp_min(0).sum()) / 5, -1.0)
    torch.testing.assert_close(power_matrix(f, 0.01, -1.0), want, rtol=1e-9, atol=1e-11)


def test_cholesky_factor_round_trip() -> None:
    g = torch.Generator().manual_seed(6)
    rows = torch.randn(4, 7, generator=g, dtype=torch.float64)  # rank 4 < 7
    f = rows.T @ rows / 4
    low = damped_cholesky(f, 0.05)
    lam = 0.05 * float(torch.trace(f)) / 7
    torch.testing.assert_close(low @ low.T, f + lam * torch.eye(7, dtype=torch.float64), rtol=1e-12, atol=1e-13)
    assert torch.equal(low, low.tril())
    torch.testing.assert_close(factor_from_cholesky(low, 0.05), f, rtol=1e-10, atol=1e-12)


def represented(q: torch.Tensor, ev: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The dense ``Q diag(s) Qᵀ + τ (I − QQᵀ)`` of a low-rank running factor."""
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    return (q * ev) @ q.T + tau * (eye - q @ q.T)


def test_lowrank_running_factor_is_the_dense_average_while_its_rank_fits() -> None:
    """Three updates of 2 rows each (rank ≤ 6 ≤ ``rank`` = 7 < d = 10): the low-rank factor equals the
    dense running average ``F ← β F + (1 − β) XᵀX`` (the first ``F = XᵀX``), with ``τ = 0``."""
    g = torch.Generator().manual_seed(3)
    state, dense = None, None
    for _ in range(3):
        x = torch.randn(2, 10, generator=g, dtype=torch.float64)
        state = lowrank_running_factor(state, x, 0.8, 7)
        dense = x.T @ x if dense is None else 0.8 * dense + 0.2 * (x.T @ x)
        torch.testing.assert_close(represented(*state), dense, rtol=1e-10, atol=1e-12)
    assert float(state[2]) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(state[0].T @ state[0], torch.eye(state[0].shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_lowrank_running_factor_truncates_to_the_top_eigenpairs_and_keeps_the_trace() -> None:
    """From a given ``(Q, s, τ)`` and rows, the update equals the top ``k`` eigenpairs of the dense
    ``β F_old + (1 − β) XᵀX`` (``F_old`` the represented factor), and ``τ`` its remaining trace over ``d − k``."""
    g = torch.Generator().manual_seed(4)
    d, k = 12, 4
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    old = (q, torch.tensor([9.0, 5.0, 3.0, 2.5], dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    want = 0.9 * represented(*old) + 0.1 * (x.T @ x)
    q2, ev2, tau2 = lowrank_running_factor(old, x, 0.9, k)
    s_all, v_all = torch.linalg.eigh(want)
    torch.testing.assert_close(ev2, s_all[-k:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q2 @ q2.T, v_all[:, -k:] @ v_all[:, -k:].T, rtol=0, atol=1e-9)  # the same subspace
    assert float(tau2) == pytest.approx((float(torch.trace(want)) - float(s_all[-k:].sum())) / (d - k), rel=1e-12)


@pytest.mark.parametrize("d", [9, 5])  # applied low-rank (2k < d) and as the dense power (2k ≥ d)
@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25])
def test_lowrank_power_is_the_dense_power_of_the_represented_factor(p: float, d: int) -> None:
    g = torch.Generator().manual_seed(5)
    k, damping = 3, 0.05
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    ev, tau = torch.tensor([4.0, 2.0, 1.5], dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    f = represented(q, ev, tau)
    want = dense_power(f, damping * float(torch.trace(f)) / d, p)
    side = lowrank_power(q, ev, tau, damping, p)
    assert (side.dense is None) == (2 * k < d)
    m = torch.randn(5, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(side.right(m), m @ want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(side.left(m.T), want @ m.T, rtol=1e-10, atol=1e-12)
