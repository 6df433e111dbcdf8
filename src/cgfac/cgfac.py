"""CG-FAC: natural-gradient directions by warm-started conjugate gradients, matrix-free.

Per covered layer and step, with rows ``a``, ``g`` from back-propagation (``cgfac.layers``)::

    curvature="kron":   G X A + λ X = ∇W                  (K-FAC's system, paper eq. 10)
    curvature="exact":  (F + λ I) vec X = vec ∇W          (the whole empirical-Fisher block)

``solver`` picks how: ``"cg"`` (Jacobi-preconditioned CG, warm-started from the layer's last
solution), ``"lowrank"`` (exact: kron through a QR of the rows and ``r × r`` eigendecompositions
per factor, exact through the ``n × n`` Gram matrix of per-sample gradients and Woodbury),
``"eigen"`` (kron only: explicit factors, eigendecomposed every step) or ``"auto"`` (the
cheapest by :mod:`cgfac.cost`). Curvature rows can be bounded to the first ``curvature_samples`` samples of
each batch and extended to a window of the last ``curvature_window`` batches with K-FAC's
running-average weights ``(1 − ρ) ρ^j`` (``ρ = factor_decay``), renormalised to sum to one.

Across processes a layer's curvature reaches its owner rank by one of two routes, chosen per layer
and step by the bytes each rank sends (``comm="auto"``, :func:`cgfac.distributed.choose_comm`):
gathering every rank's rows (``(N − 1)/N · m (d_in + d_out)`` numbers per rank for ``m`` rows),
or, for Kronecker blocks of ``curvature="kron"``, reducing the factor sums ``aᵀa``, ``gᵀg``
(``d_in² + d_out²``) — cheaper when rows outnumber the widths, as for convolutions' patch rows.
A reduced batch enters the window as explicit factors (:class:`cgfac.kron.KronFactors`); the
direction is the same either way. ``layer_stats()[name]["comm"]`` says which route was taken.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cgfac import cost
from cgfac.base import Preconditioner
from cgfac.cg import cg
from cgfac.distributed import COMM_METHODS, choose_comm, comm_bytes
from cgfac.exact import ExactRows
from cgfac.hyperparams import Hyper, HyperParam, choice, positive_int
from cgfac.kron import DAMPING_FORMS, KronEigen, KronFactors, KronRows
from cgfac.layers import LayerHelper, Rows

SOLVERS = ("auto", "cg", "lowrank", "eigen")
DEFAULT_CG_PRODUCTS = 10  # CG's assumed products per solve before any was measured
CG_PROBE_STEPS = 50  # how often a layer not solved by CG measures CG's iteration count again
STALE_DAMPING_RATIO = 2.0  # a CG count measured at a damping this far off (either way) is re-measured
COMM = ("auto", *COMM_METHODS)


@dataclass
class FactorBatch:
    """One batch's Kronecker curvature as factors summed over ranks: ``A = Σ aᵀa / rows``,
    ``G = Σ gᵀg / n`` (what :class:`cgfac.kron.KronRows` would form from the gathered rows)."""

    A: Tensor
    G: Tensor
    n: int
    rows: int


class CGFAC(Preconditioner):
    """Matrix-free K-FAC by conjugate gradients (see the module docstring).

    Args (beyond :class:`cgfac.base.Preconditioner`'s):
        curvature: "kron" or "exact".
        solver: "auto", "cg", "lowrank" or "eigen" ("eigen" needs curvature="kron").
        cg_max_iters: at most this many CG iterations per layer and step.
        cg_tol: stop CG at this relative residual ``‖∇W − 𝒜X‖ / ‖∇W‖``.
        warm_start: start CG from the layer's previous solution.
        jacobi: precondition CG by the diagonal of the damped curvature.
        curvature_samples: use only the first this-many samples of each batch for curvature.
        curvature_window: number of recent batches whose rows form the curvature.
        factor_decay: ρ of the running-average weights over the window.
        damping_form: "exact" (``G X A + λX = ∇W``) or "factored" (``(G + γ_G)X(A + γ_A) = ∇W``,
            Tikhonov split by ``π``, see :mod:`cgfac.kron`; curvature="kron" only, every solver).
            Blocks that are not Kronecker products (embeddings, normalisation layers) keep their
            own exact damping.
        comm: across processes, how a layer's curvature reaches its owner: "auto" (fewer bytes
            per rank, per layer), "gather-rows" or "reduce-factors" (Kronecker blocks of
            curvature="kron" only; other blocks always gather rows).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        curvature: str = "kron",
        solver: str = "auto",
        cg_max_iters: int = 50,
        cg_tol: Hyper = 1e-3,
        warm_start: bool = True,
        jacobi: bool = True,
        curvature_samples: int | None = None,
        curvature_window: int = 1,
        factor_decay: Hyper = 0.95,
        damping_form: str = "exact",
        comm: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.curvature = choice("curvature", curvature, ("kron", "exact"))
        self.comm = choice("comm", comm, COMM)
        self.damping_form = choice("damping_form", damping_form, DAMPING_FORMS)
        if self.damping_form == "factored" and self.curvature != "kron":
            raise ValueError("damping_form='factored' needs curvature='kron' (the exact block has no factors to "
                             "split the damping between)")
        self.solver = choice("solver", solver, SOLVERS)
        if self.curvature == "exact" and self.solver == "eigen":
            raise ValueError("solver='eigen' needs curvature='kron' (the exact block is never formed)")
        self.cg_max_iters = positive_int("cg_max_iters", cg_max_iters)
        self.cg_tol = HyperParam("cg_tol", cg_tol, low=0.0, low_open=True)
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be a bool, got {type(warm_start).__name__}")
        if not isinstance(jacobi, bool):
            raise TypeError(f"jacobi must be a bool, got {type(jacobi).__name__}")
        self.warm_start, self.jacobi = warm_start, jacobi
        self.curvature_samples = positive_int("curvature_samples", curvature_samples, allow_none=True)
        self.curvature_window = positive_int("curvature_window", curvature_window)
        self.factor_decay = HyperParam("factor_decay", factor_decay, low=0.0, high=1.0)
        super().__init__(model, **kwargs)
        self.windows: dict[str, deque[Rows | FactorBatch]] = {
            n: deque(maxlen=self.curvature_window) for n in self.layers}
        self.solutions: dict[str, Tensor] = {}
        self.last_iters: dict[str, int] = {}
        self.iters_damping: dict[str, float] = {}  # the damping each layer's last_iters was measured at
        self.probed_at: dict[str, int] = {}
        self.probe_budget: dict[str, tuple[int, str]] = {}  # a pending probe: (products, alternative)
        self.cost_constants: cost.CostConstants | None = None  # measured once, kept in checkpoints

    def _window_weights(self, count: int) -> list[float]:
        """Running-average weights, oldest first: ``(1 − ρ) ρ^j`` for the batch ``j`` steps ago."""
        rho = self.factor_decay(self.steps)
        raw = [1.0] if count == 1 else [(1 - rho) * rho**j if rho < 1 else 1.0 for j in range(count)]
        total = sum(raw) or 1.0
        return [w / total for w in reversed(raw)]

    def method_for(self, name: str, operator: KronRows | ExactRows, grad: Tensor,
                   damping: float | None = None) -> str:
        """The solve method of a layer: the forced one, or the cheapest by the cost model.

        CG's cost depends on its iteration count ``k``, known only by running it: the last
        measured count is used (10 before any). When another method is predicted cheaper but CG
        would win with one warm-started iteration, CG is probed: run with at most the products
        it could spend and still win (``probe_budget``), at the layer's first warm-startable step
        and every ``CG_PROBE_STEPS`` steps after. A probe that does not converge within that
        budget records that CG loses, and the step is solved by the alternative.

        The count depends on ``λ`` (CG needs more iterations as ``λ`` shrinks): it is remembered
        with the damping it was measured at, and once ``λ`` has moved by more than a factor
        ``STALE_DAMPING_RATIO`` since, it is stale and CG is probed at once (from the warm start
        when one is kept, cold otherwise), as the periodic probe does.
        """
        if self.solver != "auto":
            return self.solver
        if self.cost_constants is None:
            self.cost_constants = cost.calibrate(str(grad.device), grad.dtype)
        d_out, d_in = grad.shape

        def costs(k: int) -> dict[str, float]:
            if isinstance(operator, KronFactors):
                return cost.kron_costs(*operator.row_counts, d_in, d_out, k, self.cost_constants)
            if isinstance(operator, KronRows):
                return cost.kron_costs(operator.a.shape[0], operator.g.shape[0], d_in, d_out, k, self.cost_constants)
            return cost.exact_costs(operator.a.shape[0], operator.n_samples, d_in, d_out, k, self.cost_constants)

        k = self.last_iters.get(name)
        predicted = costs(DEFAULT_CG_PRODUCTS if k is None else k)
        best = cost.choose(predicted)
        budget = int(predicted[best] // costs(1)["cg"])  # CG products that would still win
        measured_at = self.iters_damping.get(name)
        stale = k is not None and damping is not None and measured_at is not None and not (
            1 / STALE_DAMPING_RATIO <= damping / measured_at <= STALE_DAMPING_RATIO)
        periodic = self._probe_due(name, self.steps) and self.warm_start and name in self.solutions
        if best != "cg" and (periodic or stale) and budget >= 2:
            self.probed_at[name] = self.steps
            self.probe_budget[name] = (budget, best)
            self.stats.setdefault(name, {})["probe"] = (
                f"damping moved from {measured_at:.3g} to {damping:.3g} since CG's count was measured"
                if stale else "periodic")
            return "cg"
        return best

    def _probe_due(self, name: str, step: int) -> bool:
        return step - self.probed_at.get(name, -CG_PROBE_STEPS) >= CG_PROBE_STEPS

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """This step's rows of each layer (gathered on its owner rank) join the layer's window."""
        rows = {name: self._rows(helper, self.curvature_samples) for name, (helper, _) in active.items()}
        if self.dist.active and rows:
            self._gather(rows, active)
        for name, r in rows.items():
            if not self.dist.owns(name) or r is None:
                continue
            parts = (r.A, r.G) if isinstance(r, FactorBatch) else (r.a, r.g)
            if not all(t.isfinite().all() for t in parts):
                self.stats[name]["fallback"] = "non-finite curvature rows (batch not kept)"
                continue
            self.windows[name].append(r)
        for name in active:
            if self.dist.owns(name) and not self.windows[name] and "fallback" not in self.stats[name]:
                self.stats[name]["fallback"] = self._no_rows_reason()

    def comm_route(self, helper: LayerHelper, max_rows: int) -> tuple[str, dict[str, float] | None]:
        """How a layer's curvature reaches its owner this step (see the module docstring), and
        the bytes per rank of both routes where both are possible."""
        if self.curvature != "kron" or helper.structure != "kron":
            return "gather-rows", None
        sizes = comm_bytes(helper.d_in, helper.d_out, max_rows, self.dist.world, row_width=sum(helper.row_widths),
                           number_bytes=torch.tensor([], dtype=self._compute_dtype(helper)).element_size())
        if self.comm != "auto":
            return self.comm, sizes
        return choose_comm(helper.d_in, helper.d_out, max_rows, self.dist.world,
                           row_width=sum(helper.row_widths)), sizes

    def _gather(self, rows: dict[str, Rows | FactorBatch | None],
                active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Replace local rows by all ranks' rows (or their summed factors) on each layer's owner
        (None elsewhere)."""
        grad0 = next(iter(active.values()))[1]
        counts = self.dist.exchange_counts(
            [(r.a.shape[0], r.n) if r is not None else (0, 0) for r in rows.values()], grad0.device)
        if not self.dist.owners:  # solve cost ∝ rows · d_in · d_out (iterations alike)
            self.dist.assign({name: sum(c[0] for c in cnt) * active[name][0].d_in * active[name][0].d_out
                              for name, cnt in zip(rows, counts)})
            self._drop_unowned()
        reduced: dict[str, tuple[list[Tensor], list[tuple[int, int]]]] = {}
        for (name, r), cnt in zip(list(rows.items()), counts):
            helper, grad = active[name]
            route, sizes = self.comm_route(helper, max(c[0] for c in cnt))
            self.stats[name]["comm"] = route
            if sizes is not None:
                self.stats[name]["comm_bytes"] = sizes
            if route == "reduce-factors":
                a_sum = r.a.T @ r.a if r is not None else grad.new_zeros(helper.d_in, helper.d_in)
                g_sum = r.g.T @ r.g if r is not None else grad.new_zeros(helper.d_out, helper.d_out)
                reduced[name] = ([a_sum, g_sum], cnt)
                continue
            rows[name] = self.dist.gather_rows(r, cnt, self.dist.owner(name), *helper.row_widths,
                                               grad.dtype, grad.device)
        self.dist.reduce_to_owners([(self.dist.owner(name), sums) for name, (sums, _) in reduced.items()])
        for name, ((a_sum, g_sum), cnt) in reduced.items():
            total_rows, total_n = sum(c[0] for c in cnt), sum(c[1] for c in cnt)
            rows[name] = FactorBatch(a_sum / total_rows, g_sum / total_n, total_n, total_rows) if (
                self.dist.owns(name) and total_rows > 0) else None

    def _drop_unowned(self) -> None:
        """Once owners are assigned, forget the state of other ranks' layers (a full state loaded
        on every rank: each keeps only what it uses)."""
        for name in self.layers:
            if not self.dist.owns(name):
                self.windows[name].clear()
                for kept in (self.solutions, self.last_iters, self.iters_damping, self.probed_at):
                    kept.pop(name, None)

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        window = self.windows[name]
        if any(isinstance(r, FactorBatch) for r in window):  # some batch arrived as reduced factors
            weights = self._window_weights(len(window))
            parts = [(r.A, r.G) if isinstance(r, FactorBatch) else KronRows.from_rows([r], [1.0]).factors()
                     for r in window]
            rows = sum(r.rows if isinstance(r, FactorBatch) else int(r.a.shape[0]) for r in window)
            operator = KronFactors(sum(w * a for w, (a, _) in zip(weights, parts)),
                                   sum(w * g for w, (_, g) in zip(weights, parts)), rows=rows)
        else:
            operator = helper.operator(self.curvature, window, self._window_weights(len(window)))
        damping = self._layer_damping(name, damping, operator)
        if hasattr(operator, "solve"):  # a direct exact solve (embedding, normalisation blocks)
            self.stats[name].update(method=operator.method, rows=sum(int(r.a.shape[0]) for r in window))
            self.solutions.pop(name, None)
            return operator.solve(grad, damping)
        return self.solve_operator(name, operator, grad, damping)

    def solve_operator(self, name: str, operator: KronRows | KronFactors | ExactRows, grad: Tensor,
                       damping: float) -> Tensor | None:
        """One layer's solve as :meth:`step` does it: choose the method, solve, keep the warm
        start and statistics. None (with ``stats[name]["fallback"]``) keeps the plain gradient."""
        method = self.method_for(name, operator, grad, damping)
        st = self.stats.setdefault(name, {"damping": damping})
        st.setdefault("damping", damping)
        kron = isinstance(operator, (KronRows, KronFactors))
        if isinstance(operator, KronFactors):  # tr(A)·tr(G) ≥ the largest eigenvalue of A ⊗ G
            st.update(method=method, rows=operator.rows)
            st["curvature_bound"] = float(operator.A.diagonal().sum()) * float(operator.G.diagonal().sum())
        else:
            st.update(method=method, rows=int(operator.a.shape[0]))
        if isinstance(operator, KronRows):
            st["curvature_bound"] = float((operator.a * operator.a).sum()) * float((operator.g * operator.g).sum())
        x = None
        form = {"form": "factored"} if self.damping_form == "factored" and kron else {}
        if form:
            st["damping_form"] = "factored"
        if method == "cg":
            x0 = self.solutions.get(name) if self.warm_start else None
            budget, alternative = self.probe_budget.pop(name, (None, None))
            max_iters = self.cg_max_iters if budget is None else min(self.cg_max_iters, budget - (x0 is not None))
            res = cg(lambda v: operator.matvec(v, damping, **form), grad, x0, max_iters=max_iters,
                     tol=self.cg_tol(self.steps), diag=operator.jacobi(damping, **form) if self.jacobi else None)
            st.update(iters=res.iters, products=res.products, rel_residual=res.rel_residual,
                      converged=res.converged, breakdown=res.breakdown)
            self.iters_damping[name] = damping
            if budget is not None and not res.converged:  # the probe shows CG loses on this layer
                self.last_iters[name] = self.cg_max_iters + 1
                method = alternative
                reason = st.get("probe", "periodic")
                st.update(method=method, probe=f"CG not converged in {res.products} products ({reason})")
            else:
                self.last_iters[name] = res.products
                if res.breakdown is not None:
                    st["fallback"] = f"CG breakdown: {res.breakdown}"
                    return None
                x = res.x
        if method == "lowrank":
            x = operator.solve_lowrank(grad, damping, **form)
        elif method == "eigen":
            x = KronEigen.from_factors(*operator.factors()).solve(grad, damping, **form)
        # A warm start is kept only where CG may run next step (a d_out × d_in copy and its memory).
        cg_next = method == "cg" or self.solver == "cg" or (
            self.solver == "auto" and self._probe_due(name, self.steps + 1))
        if self.warm_start and cg_next and x.isfinite().all():
            self.solutions[name] = x.clone()
        else:
            self.solutions.pop(name, None)
        return x

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["cost_constants"] = None if self.cost_constants is None else self.cost_constants.as_tuple()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("cost_constants")
        self.cost_constants = None if saved is None else cost.CostConstants(*saved)
        if self.dist.active and self.dist.owners:  # owners already known: keep only this rank's layers
            self._drop_unowned()

    def _layer_state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = {"window": [
            {"A": r.A, "G": r.G, "n": r.n, "rows": r.rows} if isinstance(r, FactorBatch) else (r.a, r.g, r.n)
            for r in self.windows[name]]}
        if name in self.solutions:
            state["solution"] = self.solutions[name]
        if name in self.last_iters:
            state["last_iters"] = self.last_iters[name]
        if name in self.iters_damping:
            state["iters_damping"] = self.iters_damping[name]
        if name in self.probed_at:
            state["probed_at"] = self.probed_at[name]
        return state

    def _load_layer_state(self, name: str, state: dict[str, Any], device: torch.device) -> None:
        window = self.windows[name]
        window.clear()
        for entry in state["window"][-self.curvature_window:]:
            if isinstance(entry, dict):
                window.append(FactorBatch(entry["A"].to(device).clone(), entry["G"].to(device).clone(), entry["n"],
                                          entry["rows"]))
            else:
                a, g, n = entry
                window.append(Rows(a.to(device).clone(), g.to(device).clone(), n))
        self.solutions.pop(name, None)
        self.last_iters.pop(name, None)
        self.iters_damping.pop(name, None)
        self.probed_at.pop(name, None)
        if "iters_damping" in state:
            self.iters_damping[name] = state["iters_damping"]
        if "probed_at" in state:
            self.probed_at[name] = state["probed_at"]
        if "solution" in state:
            self.solutions[name] = state["solution"].to(device).clone()
        if "last_iters" in state:
            self.last_iters[name] = state["last_iters"]
