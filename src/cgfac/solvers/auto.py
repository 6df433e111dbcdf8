"""The automatic choice as a solver of its own: the cheapest candidate by the cost model.

Per layer and step, the candidates' costs (:func:`cgfac.solvers.cost.predicted_costs`, from each
solver's formula and the constants measured once on the device) pick the method. CG's cost
depends on its product count ``k``, known only by running it: the layer's last measured count is
used (``DEFAULT_CG_PRODUCTS`` before any). When another method is predicted cheaper but CG would
win with one warm-started iteration, CG is *probed*: run with at most the products it could spend
and still win (the budget), at the layer's first warm-startable step and every
``CG_PROBE_STEPS`` steps after. A probe that does not converge within that budget records that CG
loses (``k = max_iters + 1``) and the step is solved by the alternative.

The count depends on ``λ`` (CG needs more iterations as ``λ`` shrinks): it is remembered with the
damping it was measured at, and once ``λ`` has moved by more than a factor
``STALE_DAMPING_RATIO`` since, it is stale and CG is probed at once (from the warm start when one
is kept, cold otherwise). A warm start is kept only where CG may run next step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from cgfac.solvers import cost
from cgfac.solvers.base import Solution, Solver, SolverSettings, SolverState
from cgfac.solvers.cg import CGSolver, keep_warm_start
from cgfac.solvers.registry import solver_class

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature

DEFAULT_CG_PRODUCTS = 10  # CG's assumed products per solve before any was measured
"""CG's assumed curvature products per solve before any solve was measured."""
CG_PROBE_STEPS = 50  # how often a layer not solved by CG measures CG's iteration count again
"""How often (in steps) a layer not solved by CG measures CG's iteration count again."""
STALE_DAMPING_RATIO = 2.0  # a CG count measured at a damping this far off (either way) is re-measured
"""A CG iteration count measured at a damping this many times off (either way) is measured again."""


class AutoSolver(Solver):
    """The cheapest of the registered candidates per layer and step (see the module docstring).

    Args:
        cg: the CG solver (its settings: the probes' cap, tolerance, warm start).
        others: the other candidates by name (default: every registered ``auto_candidate``).
        constants: the cost model's constants (default: measured on first use, :func:`cgfac.solvers.cost.calibrate`).
    """

    name: ClassVar[str] = "auto"
    kinds: ClassVar[tuple[str, ...]] = ("kron", "exact")

    def __init__(self, cg: CGSolver | None = None, others: Mapping[str, Solver] | None = None,
                 constants: cost.CostConstants | None = None) -> None:
        self.cg = cg or CGSolver()
        self.others = dict(others) if others is not None else None
        self.constants = constants
        self._probe_possible = True

    @classmethod
    def from_settings(cls, settings: SolverSettings) -> AutoSolver:
        return cls(CGSolver.from_settings(settings))

    def candidate(self, name: str) -> Solver:
        """The candidate solver called ``name`` (built from the registry on first use)."""
        if name == self.cg.name:
            return self.cg
        if self.others is None:
            self.others = {}
        if name not in self.others:
            settings = SolverSettings(self.cg.max_iters, self.cg.tol, self.cg.warm_start, self.cg.jacobi)
            self.others[name] = solver_class(name).from_settings(settings)
        return self.others[name]

    def supports(self, op: Curvature) -> bool:
        return op.kind in self.kinds

    def predicted(self, op: Curvature, k: int, grad: Tensor) -> dict[str, float]:
        """Every candidate's predicted cost with ``k`` CG products (calibrating on first use)."""
        if self.constants is None:
            self.constants = cost.calibrate(str(grad.device), grad.dtype)
        return cost.predicted_costs(op, k, self.constants)

    def probe_due(self, state: SolverState, step: int) -> bool:
        """Whether ``CG_PROBE_STEPS`` steps have passed since the layer's last probe."""
        last = -CG_PROBE_STEPS if state.probed_at is None else state.probed_at
        return step - last >= CG_PROBE_STEPS

    def choose(self, op: Curvature, grad: Tensor, damping: float | None, state: SolverState, *,
               step: int = 0) -> tuple[str, str | None]:
        """The method for this step and, when it is a CG probe, why (``state`` records the probe)."""
        k = state.last_iters
        predicted = self.predicted(op, DEFAULT_CG_PRODUCTS if k is None else k, grad)
        best = cost.choose(predicted)
        budget = int(predicted[best] // self.predicted(op, 1, grad)["cg"])  # CG products that would still win
        measured_at = state.iters_damping
        stale = k is not None and damping is not None and measured_at is not None and not (
            1 / STALE_DAMPING_RATIO <= damping / measured_at <= STALE_DAMPING_RATIO)
        periodic = self.probe_due(state, step) and self.cg.warm_start and state.solution is not None
        self._probe_possible = budget >= 2  # whether a CG probe could ever win here (solve keeps a warm start then)
        if best != "cg" and (periodic or stale) and budget >= 2:
            state.probed_at = step
            state.probe_budget = (budget, best)
            reason = (f"damping moved from {measured_at:.3g} to {damping:.3g} since CG's count was measured"
                      if stale else "periodic")
            return "cg", reason
        return best, None

    def solve(self, op: Curvature, grad: Tensor, damping: float, state: SolverState, *, step: int = 0,
              form: str = "exact") -> Solution:
        method, probe = self.choose(op, grad, damping, state, step=step)
        stats: dict[str, Any] = {} if probe is None else {"probe": probe}
        x: Tensor | None = None
        if method == "cg":
            budget, alternative = state.probe_budget or (None, None)
            state.probe_budget = None
            sol = self.cg.solve(op, grad, damping, state, step=step, form=form, max_products=budget, keep=False)
            stats.update(sol.stats)
            if budget is not None and alternative is not None and not sol.converged:  # CG loses on this layer
                state.last_iters = self.cg.max_iters + 1
                stats["probe"] = f"CG not converged in {sol.stats['products']} products ({probe or 'periodic'})"
                method = alternative
            elif sol.fallback is not None:
                return Solution(None, method, stats, fallback=sol.fallback)
            else:
                x = sol.x
        if method != "cg":
            sol = self.candidate(method).solve(op, grad, damping, state, step=step, form=form)
            stats.update(sol.stats)
            x = sol.x
        # A d_out × d_in warm start is kept only where CG may run next step: CG chosen, or a probe
        # due that could win (wide layers with few rows: never, so no copy is kept).
        keep = method == "cg" or (self.probe_due(state, step + 1) and self._probe_possible)
        keep_warm_start(state, x, self.cg.warm_start and keep)
        return Solution(x, method, stats)
