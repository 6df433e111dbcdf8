"""The curvature interface (:mod:`cgfac.curvature.base`): every implementation satisfies the protocol,
and a solver works on any of them (CG on K-FAC's running factors gives K-FAC's direction)."""

from __future__ import annotations

import torch
from torch import nn

import cgfac
from cgfac.curvature import Curvature, ExactRows, KronFactors, KronRows, RunningFactors
from cgfac.layers import Rows
from cgfac.solvers import CGSolver, EigenSolver, SolverState


def rows(seed: int, r: int = 10, d_in: int = 6, d_out: int = 4) -> Rows:
    gen = torch.Generator().manual_seed(seed)
    return Rows(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                torch.randn(r, d_out, generator=gen, dtype=torch.float64), r)


def test_implementations_satisfy_the_protocol() -> None:
    batch = rows(0)
    kron = KronRows.from_rows([batch], [1.0])
    ops = [kron, KronFactors(*kron.factors()), ExactRows.from_rows([batch], [1.0])]
    v = torch.randn(4, 6, dtype=torch.float64)
    for op in ops:
        assert isinstance(op, Curvature)
        assert op.shape == (4, 6)
        assert op.matvec(v, 0.1).shape == v.shape
    torch.testing.assert_close(ops[0].matvec(v, 0.1), ops[1].matvec(v, 0.1))
    torch.testing.assert_close(ops[0].jacobi(0.1), ops[1].jacobi(0.1))
    torch.testing.assert_close(ops[0].matvec(v, 0.1, form="factored"), ops[1].matvec(v, 0.1, form="factored"))
    assert ops[2].factors() is None


def test_cg_on_kfac_running_factors_gives_kfac_direction() -> None:
    """K-FAC = running factors + eigen; the same running factors solved by CG give the same X."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    pre = cgfac.KFAC(model, damping=0.1, factor_decay=0.5, inv_update_steps=1, kl_clip=None)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(10, 6, dtype=torch.float64)).pow(2).sum().backward()
        grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
        pre.step()
    running = pre.states[""].curvature
    assert isinstance(running, RunningFactors) and running.updates == 3
    op = running.operator()
    want = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    x_cg = CGSolver(1000, 1e-14).solve(op, grad, 0.1, SolverState()).x
    x_eigen = EigenSolver().solve(op, grad, 0.1, SolverState()).x
    torch.testing.assert_close(x_cg, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(x_eigen, want, rtol=1e-10, atol=1e-12)
