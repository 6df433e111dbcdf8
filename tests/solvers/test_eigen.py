"""K-FAC's solve is the eigen solver with a refresh period (:class:`cgfac.solvers.PeriodicEigenSolver`),
and each block structure's factors are its :class:`cgfac.solvers.FactorKind`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cgfac
from cgfac.curvature import KronEigen, KronFactors, KronRows
from cgfac.layers import Rows
from cgfac.solvers import (
    EigenSolver,
    FactorKind,
    KronFactorKind,
    PeriodicEigenSolver,
    SolverState,
    factor_kind,
    register_factor_kind,
)


def rows(seed: int, r: int = 10, d_in: int = 6, d_out: int = 4) -> Rows:
    gen = torch.Generator().manual_seed(seed)
    return Rows(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                torch.randn(r, d_out, generator=gen, dtype=torch.float64), r)


@pytest.mark.parametrize("form", ["dense", "diag-in", "diag-out", "diag"])
def test_kron_kind_decomposes_through_the_eigen_solver(form: str) -> None:
    kind = factor_kind("kron", 6, 4, form)
    assert isinstance(kind, KronFactorKind)
    factors = kind.batch_factors(rows(0))
    assert [f.shape for f in factors] == [f.shape for f in kind.zero_factors(factors[0])]
    decomposition = kind.decompose(factors)
    assert [t.shape for t in kind.empty_tensors(factors)] == [t.shape for t in decomposition.tensors()]
    rebuilt = kind.rebuild(decomposition.tensors())
    grad = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.solve(grad, 0.1), decomposition.solve(grad, 0.1))
    if form == "dense":  # the eigen solver's decomposition of the same factors
        torch.testing.assert_close(decomposition.solve(grad, 0.1),
                                   EigenSolver().decompose(KronFactors(*factors)).solve(grad, 0.1))


def test_periodic_solver_refreshes_on_its_period_and_solves_with_the_kept_decomposition() -> None:
    solver, state = PeriodicEigenSolver(period=3), SolverState()
    kind = factor_kind("kron", 6, 4)
    factors = KronRows.from_rows([rows(1)], [1.0]).factors()
    assert solver.due(state, 1)  # no decomposition yet
    solver.keep(state, solver.refresh(kind, factors))
    assert [solver.due(state, step) for step in (1, 2, 3, 4, 6)] == [False, False, True, False, True]
    solver.age(state)
    assert state.decomposition_age == 1
    grad = torch.randn(4, 6, dtype=torch.float64)
    eigen = state.decomposition
    assert isinstance(eigen, KronEigen)
    torch.testing.assert_close(solver.solve(state, grad, 0.1), eigen.solve(grad, 0.1))
    torch.testing.assert_close(solver.solve(state, grad, 0.1, form="factored"),
                               eigen.solve(grad, 0.1, form="factored"))
    with pytest.raises(RuntimeError, match="no decomposition"):
        solver.solve(SolverState(), grad, 0.1)


def test_kfac_period_is_its_eigen_solvers() -> None:
    pre = cgfac.KFAC(nn.Linear(3, 2), inv_update_steps=4)
    assert pre.eigen_solver.period == pre.inv_update_steps == 4
    pre.inv_update_steps = 2
    assert pre.eigen_solver.period == 2
    with pytest.raises(ValueError, match="inv_update_steps"):
        pre.inv_update_steps = 0


def test_factor_kind_registry() -> None:
    assert type(factor_kind("diag-kron", 10, 4)).__name__ == "DiagKronFactors"
    assert type(factor_kind("feature-blocks", 2, 4)).__name__ == "FeatureBlockFactors"
    assert type(factor_kind("mine", 2, 2)) is KronFactorKind  # unregistered: the dense default
    with pytest.raises(TypeError, match="FactorKind"):
        register_factor_kind("mine", object)  # type: ignore[arg-type]
    assert issubclass(KronFactorKind, FactorKind)
