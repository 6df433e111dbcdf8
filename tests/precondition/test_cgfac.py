"""CG-FAC (:mod:`cgfac.precondition.cgfac`): reduced factor sums as equivalent rows."""

from __future__ import annotations

import torch


def test_equivalent_rows_reproduce_the_factor_sums() -> None:
    """Reduced factor sums enter the window as rows with the same A = aᵀa / rows, G = gᵀg / n."""
    from cgfac.curvature import KronRows
    from cgfac.precondition.cgfac import equivalent_rows

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    rows = equivalent_rows(a.T @ a, g.T @ g, rows=40, n=10)
    assert rows.a.shape[0] <= 6 and rows.g.shape[0] <= 3
    a_factor, g_factor = KronRows.from_rows([rows], [1.0]).factors()
    assert torch.allclose(a_factor, a.T @ a / 40, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_factor, g.T @ g / 10, rtol=1e-12, atol=1e-12)
