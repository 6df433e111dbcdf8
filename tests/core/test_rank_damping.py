"""``damping_scale="rank"``: a wide layer with few rows is damped by ``λ·tr(C)/rank(C)``, the mean of
its non-zero spectrum, against the dense float64 system (explicit ``torch.kron``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgfac
from cgfac.curvature import KronRows

DAMPING = 0.05


def _step(**kwargs: object) -> tuple[nn.Module, cgfac.CGFAC]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 6, (9,), generator=torch.Generator().manual_seed(2))
    pre = cgfac.CGFAC(model, damping=DAMPING, kl_clip=None, curvature_samples=3, damping_scale="rank", **kwargs)
    F.cross_entropy(model(x), y).backward()
    grads = {name: h.grad_matrix().clone() for name, h in pre.layers.items()}
    pre.step()
    return model, pre, grads


@pytest.mark.parametrize("solver", ["lowrank", "cg", "eigen"])
def test_rank_damping_matches_the_dense_spectrum(solver: str) -> None:
    _, pre, grads = _step(solver=solver, cg_tol=1e-13, cg_max_iters=5000)
    for name, helper in pre.layers.items():
        rows = pre.windows[name].batches[0]
        a_factor, g_factor = KronRows.from_rows([rows], [1.0]).factors()
        dense = torch.kron(a_factor, g_factor)  # vec(G X A) = (A ⊗ G) vec X, column-major vec
        eig = torch.linalg.eigvalsh(dense)
        rank = int((eig > 1e-10 * eig.max()).sum())
        assert rank == min(3, helper.d_in) * min(3, helper.d_out) < dense.shape[0]  # few rows: low rank
        scale = float(eig.sum()) / rank
        st = pre.layer_stats()[name]
        assert st["damping"] == pytest.approx(DAMPING * scale, rel=1e-10)
        b = grads[name].T.reshape(-1)
        want = torch.linalg.solve(dense + DAMPING * scale * torch.eye(dense.shape[0], dtype=dense.dtype), b)
        got = helper.grad_matrix()
        torch.testing.assert_close(got, want.reshape(helper.d_in, helper.d_out).T, rtol=1e-7, atol=1e-9)


def test_rank_scale_differs_from_relative_by_dim_over_rank() -> None:
    _, rank_pre, _ = _step(solver="lowrank")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 6, (9,), generator=torch.Generator().manual_seed(2))
    rel = cgfac.CGFAC(model, damping=DAMPING, kl_clip=None, curvature_samples=3, damping_scale="relative",
                      solver="lowrank")
    F.cross_entropy(model(x), y).backward()
    rel.step()
    for name, helper in rel.layers.items():
        dims = helper.d_in * helper.d_out
        rank = min(3, helper.d_in) * min(3, helper.d_out)
        assert rank_pre.layer_stats()[name]["damping"] == pytest.approx(
            rel.layer_stats()[name]["damping"] * dims / rank, rel=1e-10)


def test_rank_is_a_damping_scale_option() -> None:
    with pytest.raises(ValueError, match="damping_scale"):
        cgfac.CGFAC(nn.Linear(3, 2), damping_scale="ranked")  # type: ignore[arg-type]
