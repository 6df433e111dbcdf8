"""The exact empirical-Fisher block (:mod:`cgfac.curvature.exact`): products against the per-sample
Fisher, its Gram and low-rank routes (float64)."""

from __future__ import annotations

import pytest
import torch
from reference import Case, double_model, exact_fisher, library_rows, per_sample_grads, unvec, vec

from cgfac.curvature.exact import ExactRows


def test_exact_product_matches_per_sample_fisher(case: Case) -> None:
    model = double_model(case)
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
