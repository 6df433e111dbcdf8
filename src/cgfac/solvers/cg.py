"""Matrix-free conjugate gradients on any curvature with products (``matvec``).

Jacobi-preconditioned by the curvature's diagonal (``jacobi``), warm-started from the layer's last
solution (:class:`~cgfac.solvers.base.SolverState`), stopped at relative residual ``tol`` or
``max_iters`` iterations (:func:`cgfac.solvers.pcg.cg`). Cost of ``k`` products (``p = d_in·d_out``)::

    kron    k · (thin · min((r_g + r_a) p + r_g r_a (d_in + d_out), 2 (r_g + r_a) p) + 4p + o_iter)
    exact   k · (thin · 2 r p + 4p + o_iter)     (jvp ``(gV)⊙a``: r p, vjp ``gᵀ diag(c) a``: r p)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from cgfac.config import HyperParam
from cgfac.solvers.base import Solution, Solver, SolverSettings, SolverState, form_keyword
from cgfac.solvers.pcg import CGResult, cg

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature
    from cgfac.solvers.base import CostConstants


class CGSolver(Solver):
    """Warm-started, Jacobi-preconditioned CG (see the module docstring)."""

    name: ClassVar[str] = "cg"
    kinds: ClassVar[tuple[str, ...]] = ("kron", "exact", "kron-factors")
    auto_candidate: ClassVar[bool] = True

    def __init__(self, max_iters: int = 50, tol: HyperParam | float = 1e-3, *, jacobi: bool = True,
                 warm_start: bool = True) -> None:
        self.max_iters = max_iters
        self.tol = tol if isinstance(tol, HyperParam) else HyperParam("cg_tol", tol, low=0.0, low_open=True)
        self.jacobi = jacobi
        self.warm_start = warm_start

    @classmethod
    def from_settings(cls, settings: SolverSettings) -> CGSolver:
        return cls(settings.cg_max_iters, settings.cg_tol, jacobi=settings.jacobi, warm_start=settings.warm_start)

    def supports(self, op: Curvature) -> bool:
        return True  # every curvature has the products and the diagonal CG needs

    @staticmethod
    def kron_cost(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float:
        p = d_in * d_out
        product = min((r_g + r_a) * p + r_g * r_a * (d_in + d_out), 2 * (r_g + r_a) * p)
        return k * (c.thin * product + 4 * p + c.o_iter)

    @staticmethod
    def exact_cost(rows: int, n: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float:
        p = d_in * d_out
        return k * (c.thin * 2 * rows * p + 4 * p + c.o_iter)

    def run(self, op: Curvature, grad: Tensor, damping: float, x0: Tensor | None = None, *, step: int = 0,
            max_iters: int | None = None, form: str = "exact") -> CGResult:
        """One CG solve of ``op`` from ``x0`` (zeros if None) with this solver's settings."""
        kw = form_keyword(form)
        return cg(lambda v: op.matvec(v, damping, **kw), grad, x0,
                  max_iters=self.max_iters if max_iters is None else max_iters, tol=self.tol(step),
                  diag=op.jacobi(damping, **kw) if self.jacobi else None)

    def solve(self, op: Curvature, grad: Tensor, damping: float, state: SolverState, *, step: int = 0,
              form: str = "exact", max_products: int | None = None, keep: bool = True) -> Solution:
        """CG from the warm start; records its products (at this damping) in ``state``.

        ``max_products`` bounds the products, warm start's residual included (a probe's budget);
        ``keep``: store the result as the next warm start (the automatic choice decides itself).
        A breakdown keeps the plain gradient (``fallback``) and the previous warm start.
        """
        x0 = state.solution if self.warm_start else None
        max_iters = self.max_iters if max_products is None else min(self.max_iters, max_products - (x0 is not None))
        res = self.run(op, grad, damping, x0, step=step, max_iters=max_iters, form=form)
        stats = {"iters": res.iters, "products": res.products, "rel_residual": res.rel_residual,
                 "converged": res.converged, "breakdown": res.breakdown}
        state.iters_damping = float(damping)  # a Python float in checkpoints (a tensor λ: one read, CG reads anyway)
        state.last_iters = res.products
        if res.breakdown is not None:
            return Solution(None, self.name, stats, fallback=f"CG breakdown: {res.breakdown}",
                            converged=res.converged)
        if keep:
            keep_warm_start(state, res.x, self.warm_start)
        return Solution(res.x, self.name, stats, converged=res.converged)


def keep_warm_start(state: SolverState, x: Tensor | None, keep: bool) -> None:
    """Store a copy of a finite ``x`` as the next warm start when ``keep``; else forget any."""
    state.solution = x.clone() if keep and x is not None and bool(x.isfinite().all()) else None
