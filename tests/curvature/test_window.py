"""CG-FAC's row window (:mod:`cgfac.curvature.window`): its weighted sum of batches, weights and state."""

from __future__ import annotations

import torch
from reference import exact_fisher, unvec, vec

from cgfac.curvature import ExactRows, KronRows, RowWindow
from cgfac.layers import Rows


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


def rows(seed: int, r: int = 10, d_in: int = 6, d_out: int = 4) -> Rows:
    gen = torch.Generator().manual_seed(seed)
    return Rows(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                torch.randn(r, d_out, generator=gen, dtype=torch.float64), r)


def test_row_window_weights_and_state() -> None:
    window = RowWindow(2)
    for seed in range(3):
        window.append(rows(seed))
    assert len(window) == 2 and window.num_rows == 20
    w = window.weights(0.5)
    assert abs(sum(w) - 1) < 1e-12 and w[1] > w[0]  # newest last, heaviest
    other = RowWindow(1)
    other.load_state_dict(window.state_dict(), torch.device("cpu"))
    assert len(other) == 1 and torch.equal(next(iter(other)).a, list(window)[-1].a)
