"""Adding a solver is one class and one registry line: a toy dense Cholesky solve of the damped
Kronecker system gives K-FAC's eigen directions, through the public constructor."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from reference import covered
from torch import Tensor, nn

import cgfac
from cgfac.curvature import KronRows
from cgfac.solvers import DirectSolver, Solver, cost, register_solver, solver_names, unregister_solver


class CholeskySolver(DirectSolver):
    """Form ``G ⊗ A + λI`` (row-major ``vec``) densely and solve it by Cholesky."""

    name: ClassVar[str] = "dense-cholesky"
    kinds: ClassVar[tuple[str, ...]] = ("kron", "kron-factors")

    def direct(self, op, grad: Tensor, damping: float, form: str = "exact") -> Tensor:
        a_f, g_f = op.factors()
        system = torch.kron(g_f, a_f) + damping * torch.eye(grad.numel(), dtype=grad.dtype)
        chol = torch.linalg.cholesky(system)
        return torch.cholesky_solve(grad.reshape(-1, 1), chol).reshape(grad.shape)


@pytest.fixture
def cholesky():
    register_solver(CholeskySolver)
    yield CholeskySolver
    unregister_solver(CholeskySolver.name)


def directions(model: nn.Module, case, **kwargs) -> dict[str, Tensor]:
    pre = cgfac.CGFAC(model, damping=0.05, kl_clip=None, **kwargs)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    stats = pre.layer_stats()
    assert all(st["method"] == kwargs["solver"] for st in stats.values())
    return {name: m.weight.grad.clone() for name, m in covered(model).items()}


def test_registered_toy_solver_matches_eigen(cholesky, dense_cases) -> None:
    for case in dense_cases:
        torch.manual_seed(0)
        model = case.make_model().double()
        want = directions(model, case, solver="eigen")
        got = directions(model, case, solver=cholesky.name)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_toy_solver_with_factored_damping_is_refused_only_by_its_kinds(cholesky) -> None:
    with pytest.raises(ValueError, match="curvature='kron'"):
        cgfac.CGFAC(nn.Linear(3, 2), curvature="exact", solver=cholesky.name)


def test_unknown_solver_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="lowrank"):
        cgfac.CGFAC(nn.Linear(3, 2), solver="no-such-solver")
    assert {"auto", "cg", "lowrank", "eigen"} <= set(solver_names())


def test_an_auto_candidate_joins_the_cost_table() -> None:
    class Free(CholeskySolver):
        name: ClassVar[str] = "free"
        auto_candidate: ClassVar[bool] = True

        @staticmethod
        def kron_cost(r_a, r_g, d_in, d_out, k, c) -> float:
            return 0.0

    register_solver(Free)
    try:
        c = cost.CostConstants(1, 1, 1, 1, 0, 0)
        assert cost.kron_costs(8, 8, 4, 3, 10, c)["free"] == 0.0
        assert "free" not in cost.exact_costs(8, 8, 4, 3, 10, c)
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        pre = cgfac.CGFAC(model, kl_clip=None)
        pre.cost_constants = c
        model(torch.randn(8, 4, dtype=torch.float64)).pow(2).sum().backward()
        pre.step()
        assert pre.layer_stats()[""]["method"] == "free"
    finally:
        unregister_solver("free")


def test_solver_objects_solve_outside_a_preconditioner() -> None:
    """The public solver objects alone: every method on one Kronecker system agrees."""
    from cgfac.solvers import AutoSolver, CGSolver, SolverState, make_solver

    gen = torch.Generator().manual_seed(0)
    op = KronRows(torch.randn(12, 9, generator=gen, dtype=torch.float64),
                  torch.randn(12, 5, generator=gen, dtype=torch.float64))
    grad = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    want = make_solver("eigen").solve(op, grad, 0.1, SolverState()).x
    solvers: list[Solver] = [make_solver("lowrank"), CGSolver(500, 1e-14), AutoSolver(CGSolver(500, 1e-14))]
    for solver in solvers:
        assert solver.supports(op)
        state = SolverState()
        sol = solver.solve(op, grad, 0.1, state)
        torch.testing.assert_close(sol.x, want, rtol=1e-9, atol=1e-12)
    cg_state = SolverState()
    CGSolver(500, 1e-14).solve(op, grad, 0.1, cg_state)
    assert cg_state.solution is not None and cg_state.last_iters is not None and cg_state.iters_damping == 0.1
