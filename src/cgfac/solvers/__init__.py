"""Solvers of a layer's damped system, one object per method, and their registry.

* :mod:`~cgfac.solvers.base`: the interface (:class:`Solver`: ``supports``, ``cost``, ``solve``),
  the per-layer :class:`SolverState` and a solve's :class:`Solution`.
* :mod:`~cgfac.solvers.cg`: matrix-free, warm-started, Jacobi-preconditioned CG (``"cg"``).
* :mod:`~cgfac.solvers.lowrank`: exact through the rows' low rank / Woodbury (``"lowrank"``).
* :mod:`~cgfac.solvers.eigen`: eigendecomposed explicit factors (``"eigen"``); K-FAC's solve, the
  same with a refresh period (:class:`PeriodicEigenSolver`), and how each block type's factors are
  formed and decomposed (:class:`FactorKind`, :func:`register_factor_kind`).
* :mod:`~cgfac.solvers.auto`: the cheapest candidate by the cost model, with CG probes (``"auto"``).
* :mod:`~cgfac.solvers.registry`: ``solver=`` names; :func:`register_solver` adds one.
"""

from cgfac.solvers.auto import CG_PROBE_STEPS, DEFAULT_CG_PRODUCTS, STALE_DAMPING_RATIO, AutoSolver
from cgfac.solvers.base import Decomposition, DirectSolver, Solution, Solver, SolverSettings, SolverState
from cgfac.solvers.cg import CGSolver
from cgfac.solvers.eigen import (
    EigenSolver,
    FactorKind,
    KronFactorKind,
    PeriodicEigenSolver,
    factor_kind,
    register_factor_kind,
)
from cgfac.solvers.lowrank import LowRankSolver
from cgfac.solvers.registry import (
    candidates,
    make_solver,
    register_solver,
    solver_class,
    solver_names,
    unregister_solver,
)

# Registration order breaks cost ties: eigen before lowrank (with r ≥ d on both sides the
# low-rank route is eigen plus arithmetic).
for _solver in (CGSolver, EigenSolver, LowRankSolver, AutoSolver):
    register_solver(_solver)

__all__ = [
    "CG_PROBE_STEPS", "DEFAULT_CG_PRODUCTS", "STALE_DAMPING_RATIO", "AutoSolver", "CGSolver", "Decomposition",
    "DirectSolver", "EigenSolver", "FactorKind", "KronFactorKind", "LowRankSolver", "PeriodicEigenSolver",
    "Solution", "Solver", "SolverSettings", "SolverState", "candidates", "factor_kind", "make_solver",
    "register_factor_kind", "register_solver", "solver_class", "solver_names", "unregister_solver",
]
