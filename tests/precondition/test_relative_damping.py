"""``damping_scale="relative"``: every solve path damps layer ``l`` by ``λ·s_l``, ``s_l`` the mean
diagonal of the layer's curvature, against ``torch.linalg.solve`` on the dense system (float64)."""

from __future__ import annotations

import pytest
import torch
from preconditioners import preconditioned_grads
from reference import (
    Case,
    capture,
    cases,
    covered,
    dense_kron,
    exact_fisher,
    factors,
    mean_grad,
    per_sample_grads,
    unvec,
    vec,
)

import cgfac
from cgfac.curvature.exact import ExactRows
from cgfac.layers.base import Rows
from cgfac.layers.embedding import DiagKron, DiagKronEigen, ExactIndexRows
from cgfac.layers.norm import FeatureBlocks

CASES = cases()
DAMPING = 0.3

PRECONDITIONERS = {
    "kfac": lambda m: cgfac.KFAC(m, damping=DAMPING, factor_decay=0.0, inv_update_steps=1, kl_clip=None,
                                 damping_scale="relative"),
    "cgfac-kron-cg": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="cg", cg_tol=1e-13,
                                           cg_max_iters=2000, damping_scale="relative"),
    "cgfac-kron-lowrank": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="lowrank",
                                                damping_scale="relative"),
    "cgfac-exact-cg": lambda m: cgfac.CGFAC(m, curvature="exact", damping=DAMPING, kl_clip=None, solver="cg",
                                            cg_tol=1e-13, cg_max_iters=2000, damping_scale="relative"),
    "cgfac-exact-lowrank": lambda m: cgfac.CGFAC(m, curvature="exact", damping=DAMPING, kl_clip=None,
                                                 solver="lowrank", damping_scale="relative"),
}


def dense_systems(case: Case, model: torch.nn.Module, exact: bool) -> dict[str, torch.Tensor]:
    if exact:
        return {name: exact_fisher(j) for name, j in per_sample_grads(case, model).items()}
    return {name: dense_kron(*factors(a, g, n)) for name, (a, g, n) in capture(case, model).items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", list(PRECONDITIONERS))
def test_relative_damping_matches_dense_solve(case: Case, kind: str) -> None:
    torch.manual_seed(0)
    model = case.make_model().double()
    systems = dense_systems(case, model, exact="exact" in kind)
    grads = mean_grad(case, model)
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    got = preconditioned_grads(model)
    for name, system in systems.items():
        scale = float(torch.diagonal(system).mean())
        st = pre.layer_stats()[name]
        assert st["curvature_scale"] == pytest.approx(scale, rel=1e-10)
        assert st["damping"] == pytest.approx(DAMPING * scale, rel=1e-10)
        eye = torch.eye(system.shape[0], dtype=system.dtype)
        want = unvec(torch.linalg.solve(system + DAMPING * scale * eye, vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(got[name], want, rtol=1e-8, atol=1e-10)
    assert set(got) == set(covered(model))


def test_mean_diagonals_of_the_other_blocks() -> None:
    """Feature blocks, the embedding's diagonal-input Kronecker system (rows and eigen form) and its
    exact block, against the diagonal of the dense matrix."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(5, 2, 2, generator=gen, dtype=torch.float64)
    blocks = blocks @ blocks.transpose(1, 2)
    assert FeatureBlocks(blocks).mean_diagonal() == pytest.approx(
        float(torch.diagonal(torch.block_diag(*blocks)).mean()), rel=1e-12)
    # Embedding: 4 samples × 3 positions over a vocabulary of 6, one padding row (index −1).
    idx = torch.tensor([0, 2, 2, 5, 1, 0, 3, 3, 3, -1, 4, 2], dtype=torch.float64)
    g = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    rows = Rows(a=idx[:, None], g=g, n=4)
    g_kept = g * (idx >= 0)[:, None]
    onehot = torch.zeros(12, 6, dtype=torch.float64)
    onehot[idx >= 0, idx[idx >= 0].long()] = 1
    a_f = onehot.T @ onehot / 12
    g_f = g_kept.T @ g_kept / 4
    dense = torch.kron(a_f, g_f)
    kron = DiagKron.from_rows([rows], [1.0], 6)
    assert kron.mean_diagonal() == pytest.approx(float(torch.diagonal(dense).mean()), rel=1e-12)
    s, q = torch.linalg.eigh(g_f)
    assert DiagKronEigen(torch.diagonal(a_f).clone(), s, q).mean_diagonal() == pytest.approx(
        float(torch.diagonal(dense).mean()), rel=1e-12)
    # Exact: J_s = Σ_t g_t e_{i_t}ᵀ over each sample's 3 positions, F = (1/n) Σ_s vec J_s vec J_sᵀ.
    jac = torch.einsum("stk,stv->skv", g_kept.reshape(4, 3, 3), onehot.reshape(4, 3, 6))
    exact = ExactIndexRows.from_index_rows([rows], [1.0], 6)
    assert exact.mean_diagonal() == pytest.approx(float(torch.diagonal(exact_fisher(jac)).mean()), rel=1e-12)
    # And the same through dense rows (ExactRows with the one-hot rows themselves).
    dense_rows = ExactRows.from_rows([Rows(a=onehot, g=g_kept, n=4)], [1.0])
    assert dense_rows.mean_diagonal() == pytest.approx(exact.mean_diagonal(), rel=1e-12)


def test_damping_scale_is_checked() -> None:
    with pytest.raises(ValueError, match="damping_scale"):
        cgfac.KFAC(torch.nn.Linear(2, 2), damping_scale="layerwise")
