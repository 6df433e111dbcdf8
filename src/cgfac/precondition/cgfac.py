"""CG-FAC: natural-gradient directions by warm-started conjugate gradients, matrix-free.

Per covered layer and step, with rows ``a``, ``g`` from back-propagation (``cgfac.layers``)::

    curvature="kron":   G X A + λ X = ∇W                  (K-FAC's system, paper eq. 10)
    curvature="exact":  (F + λ I) vec X = vec ∇W          (the whole empirical-Fisher block)

``solver`` picks how: ``"cg"`` (Jacobi-preconditioned CG, warm-started from the layer's last
solution), ``"lowrank"`` (exact: kron through a QR of the rows and ``r × r`` eigendecompositions
per factor, exact through the ``n × n`` Gram matrix of per-sample gradients and Woodbury),
``"eigen"`` (kron only: explicit factors, eigendecomposed every step), ``"auto"`` (the
cheapest by :mod:`cgfac.solvers.cost`) or any solver registered with :func:`cgfac.solvers.register_solver`
(one object per method, :mod:`cgfac.solvers`). Curvature rows can be bounded to the first
``curvature_samples`` samples of each batch and extended to a window of the last
``curvature_window`` batches with K-FAC's running-average weights ``(1 − ρ) ρ^j``
(``ρ = factor_decay``), renormalised to sum to one.

Across processes a layer's curvature reaches its owner rank by one of two routes, chosen per layer
and step by the bytes each rank sends (``comm="auto"``, :func:`cgfac.distributed.collectives.choose_comm`):
gathering every rank's rows (``(N − 1)/N · m (d_in + d_out)`` numbers per rank for ``m`` rows),
or, for Kronecker blocks of ``curvature="kron"``, reducing the factor sums ``aᵀa``, ``gᵀg``
(``d_in² + d_out²``) — cheaper when rows outnumber the widths, as for convolutions' patch rows.
The owner turns reduced sums into equivalent rows (``ã = diag(√s) Qᵀ`` from ``aᵀa = Q diag(s) Qᵀ``,
at most ``d`` rows, :func:`equivalent_rows`), so windows, solvers and checkpoints are unchanged
and the direction is the same either way. ``layer_stats()[name]["comm"]`` says which route.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from cgfac.config import CurvatureKind, DampingForm, Hyper, HyperParam, check, positive_int
from cgfac.curvature import Curvature, DirectCurvature, KronRows, RowWindow, eigh
from cgfac.distributed.collectives import COMM_METHODS, choose_comm, comm_bytes
from cgfac.layers import LayerHelper, Rows
from cgfac.precondition.base import Preconditioner
from cgfac.precondition.memory import Block, BlockMemory, plan_cgfac
from cgfac.precondition.state import LayerState, StateView, solver_field
from cgfac.solvers import (
    CG_PROBE_STEPS,
    DEFAULT_CG_PRODUCTS,
    STALE_DAMPING_RATIO,
    AutoSolver,
    Solver,
    SolverSettings,
    SolverState,
    cost,
    make_solver,
    solver_class,
    solver_names,
)
from cgfac.solvers.base import check_keyword

__all__ = ["CGFAC", "CG_PROBE_STEPS", "DEFAULT_CG_PRODUCTS", "SOLVERS", "STALE_DAMPING_RATIO"]
SOLVERS = ("auto", "cg", "lowrank", "eigen")  # the built-in solvers (see cgfac.solvers.solver_names())
COMM = ("auto", *COMM_METHODS)
GRAFT_MIN_ROWS_SHARE = 0.5  # graft="rmsprop" warns below this many rows per unit of a layer's smaller side


def equivalent_rows(a_sum: Tensor, g_sum: Tensor, rows: int, n: int) -> Rows:
    """Rows whose curvature equals factor sums over ``rows`` rows and ``n`` samples: with
    ``aᵀa = Q_A diag(s_A) Q_Aᵀ`` the rows ``diag(√s_A) Q_Aᵀ`` (positive ``s`` only), scaled so that
    :meth:`KronRows.from_rows` (which divides ``A`` by the row count, ``G`` by ``n``) gives
    ``A = aᵀa / rows`` and ``G = gᵀg / n``. At most ``d_in`` and ``d_out`` rows."""
    def root(m: Tensor) -> Tensor:
        s, q = eigh(m)
        keep = s > 0
        if not bool(keep.any()):
            keep[-1] = True  # one zero row keeps the shapes
        return s[keep].sqrt()[:, None] * q[:, keep].T

    a, g = root(a_sum), root(g_sum)
    return Rows(a * (a.shape[0] / rows) ** 0.5, g, n)


class CGFAC(Preconditioner):
    """Matrix-free K-FAC by conjugate gradients (see the module docstring).

    Args (beyond :class:`cgfac.precondition.base.Preconditioner`'s):
        curvature: "kron" or "exact".
        solver: "auto", "cg", "lowrank" or "eigen" ("eigen" needs curvature="kron"), or the name of
            a solver registered with :func:`cgfac.solvers.register_solver`.
        cg_max_iters: at most this many CG iterations per layer and step.
        cg_tol: stop CG at this relative residual ``‖∇W − 𝒜X‖ / ‖∇W‖``.
        warm_start: start CG from the layer's previous solution.
        jacobi: precondition CG by the diagonal of the damped curvature.
        curvature_samples: use only the first this-many entries of each batch (dim 0 of the
            inputs: a sequence with all its positions) for curvature; rows are built for those only.
        curvature_window: number of recent batches whose rows form the curvature.
        factor_decay: ρ of the running-average weights over the window.
        damping_form: "exact" (``G X A + λX = ∇W``) or "factored" (``(G + γ_G)X(A + γ_A) = ∇W``,
            Tikhonov split by ``π``, see :mod:`cgfac.curvature.kron`; curvature="kron" only, every
            solver). Blocks that are not Kronecker products (embeddings, normalisation layers) keep
            their own exact damping.
        comm: across processes, how a layer's curvature reaches its owner: "auto" (fewer bytes
            per rank, per layer), "gather-rows" or "reduce-factors" (Kronecker blocks of
            curvature="kron" only; other blocks always gather rows).

    Per block, :attr:`states` holds a :class:`cgfac.precondition.state.LayerState`: the window of rows, the
    solver's state (warm start, CG counts, probes) and the last statistics. ``solutions``,
    ``last_iters``, ``iters_damping``, ``probed_at`` and ``probe_budget`` are dict-like views of the
    solver states' fields.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        curvature: CurvatureKind = "kron",
        solver: str = "auto",
        cg_max_iters: int = 50,
        cg_tol: Hyper = 1e-3,
        warm_start: bool = True,
        jacobi: bool = True,
        curvature_samples: int | None = None,
        curvature_window: int = 1,
        factor_decay: Hyper = 0.95,
        damping_form: DampingForm = "exact",
        comm: str = "auto",
        **kwargs: Any,
    ) -> None:
        if comm not in COMM:
            raise ValueError(f"comm must be one of {COMM}, got {comm!r}")
        self.comm = comm
        self.curvature: CurvatureKind = check("curvature", curvature, CurvatureKind)
        self.damping_form: DampingForm = check("damping_form", damping_form, DampingForm)
        if self.damping_form == "factored" and self.curvature != "kron":
            raise ValueError("damping_form='factored' needs curvature='kron' (the exact block has no factors to "
                             "split the damping between)")
        method = solver_class(solver)
        if self.curvature not in method.kinds:
            allowed = " or ".join(repr(k) for k in ("kron", "exact") if k in method.kinds)
            raise ValueError(f"solver={solver!r} needs curvature={allowed} (it does not solve the "
                             f"{self.curvature!r} curvature; solvers: {solver_names()})")
        self.solver = solver
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
        self.solver_object: Solver = make_solver(solver, SolverSettings(
            cg_max_iters=self.cg_max_iters, cg_tol=self.cg_tol, warm_start=warm_start, jacobi=jacobi))
        self._cost_constants: cost.CostConstants | None = None
        self._warned_graft_rows = False
        super().__init__(model, **kwargs)

    def _plan_memory(self, blocks: dict[str, Block]) -> dict[str, BlockMemory]:
        """Each block's state (:func:`cgfac.precondition.memory.plan_cgfac`): rows, and explicit factors with
        ``solver="eigen"`` (``ValueError`` when they do not fit the budget)."""
        return plan_cgfac(blocks, self.memory_budget, solver=self.solver, window=self.curvature_window,
                          graft=self.graft != "none")

    def _new_state(self, helper: LayerHelper) -> LayerState:
        return LayerState(helper, RowWindow(self.curvature_window))

    # Views of the per-layer solver states (read and written by name).
    solutions = property(lambda self: solver_field(lambda: self.states, "solution"))
    last_iters = property(lambda self: solver_field(lambda: self.states, "last_iters"))
    iters_damping = property(lambda self: solver_field(lambda: self.states, "iters_damping"))
    probed_at = property(lambda self: solver_field(lambda: self.states, "probed_at"))
    probe_budget = property(lambda self: solver_field(lambda: self.states, "probe_budget"))

    @property
    def windows(self) -> StateView:
        """Each layer's :class:`~cgfac.curvature.RowWindow` (a view of the layer states)."""
        return StateView(lambda: self.states, lambda s: s.curvature)

    @property
    def cost_constants(self) -> cost.CostConstants | None:
        """The cost model's constants of ``solver="auto"`` (measured once, kept in checkpoints)."""
        if isinstance(self.solver_object, AutoSolver):
            return self.solver_object.constants
        return self._cost_constants

    @cost_constants.setter
    def cost_constants(self, value: cost.CostConstants | None) -> None:
        if isinstance(self.solver_object, AutoSolver):
            self.solver_object.constants = value
        self._cost_constants = value

    def method_for(self, name: str, operator: Curvature, grad: Tensor, damping: float | None = None) -> str:
        """The solve method of a layer this step: the forced one, or the automatic choice
        (:meth:`cgfac.solvers.AutoSolver.choose`, which may schedule a CG probe)."""
        if not isinstance(self.solver_object, AutoSolver):
            return self.solver
        method, probe = self.solver_object.choose(operator, grad, damping, self._state(name).solver,
                                                  step=self.steps)
        if probe is not None:
            self.stats.setdefault(name, {})["probe"] = probe
        return method

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """This step's rows of each layer (gathered on its owner rank) join the layer's window."""
        self._appended: dict[str, Rows | None] = {}  # layers whose window took this step's rows: the batch it evicted
        rows = {name: self._rows(helper, self.curvature_samples) for name, (helper, _) in active.items()}
        if self.dist.active and rows:
            self._gather(rows, active)
        for name, r in rows.items():
            if not self.dist.owns(name) or r is None:
                continue
            if self.route.defers:  # the one-read step: checked after the fact (_collect_undo)
                self.route.defer(name, "rows", (r.a.sum() + r.g.sum()).isfinite())
                window = self._window(name)
                self._appended[name] = window.batches[0] if len(window) == window.size else None
                window.append(r)
                continue
            if not (r.a.isfinite().all() and r.g.isfinite().all()):
                self.stats[name]["fallback"] = "non-finite curvature rows (batch not kept)"
                continue
            self._window(name).append(r)
        for name in active:
            if self.dist.owns(name) and not self._window(name) and "fallback" not in self.stats[name]:
                self.stats[name]["fallback"] = self.capture.no_rows_reason()

    reads_once = True
    _appended: dict[str, Rows | None]

    def _collect_undo(self, names: list[str]) -> None:
        for name in names:
            if name in self._appended:
                evicted = self._appended.pop(name)
                window = self._window(name)
                window.batches.pop()
                if evicted is not None:
                    window.batches.appendleft(evicted)

    def _window(self, name: str) -> RowWindow:
        window = self.states[name].curvature
        assert isinstance(window, RowWindow)
        return window

    def comm_route(self, helper: LayerHelper, max_rows: int) -> tuple[str, dict[str, float] | None]:
        """How a layer's curvature reaches its owner this step (see the module docstring), and
        the bytes per rank of both routes where both are possible."""
        if self.curvature != "kron" or helper.structure != "kron":
            return "gather-rows", None
        width = sum(helper.row_widths)
        sizes = comm_bytes(helper.d_in, helper.d_out, max_rows, self.dist.world, row_width=width,
                           number_bytes=torch.finfo(self.compute_dtype(helper)).bits // 8)
        if self.comm != "auto":
            return self.comm, sizes
        return choose_comm(helper.d_in, helper.d_out, max_rows, self.dist.world, row_width=width), sizes

    def _gather(self, rows: dict[str, Rows | None], active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Replace local rows by all ranks' rows, or rows equivalent to their summed factors, on
        each layer's owner (None elsewhere)."""
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
            rows[name] = None
            if self.dist.owns(name) and total_rows > 0:
                if not (a_sum.isfinite().all() and g_sum.isfinite().all()):
                    self.stats[name]["fallback"] = "non-finite curvature rows (batch not kept)"
                    continue
                rows[name] = equivalent_rows(a_sum, g_sum, total_rows, total_n)

    def _drop_unowned(self) -> None:
        """Once owners are assigned, forget the state of other ranks' layers (a full state loaded
        on every rank: each keeps only what it uses)."""
        for name in self.layers:
            if not self.dist.owns(name):
                self._window(name).clear()
                self.states[name].solver = SolverState()

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        window = self._window(name)
        operator = helper.operator(self.curvature, list(window), window.weights(self.factor_decay(self.steps)))
        damping = self._layer_damping(name, damping, operator)
        if isinstance(operator, DirectCurvature):  # a closed-form exact solve (embedding, normalisation blocks)
            self.stats[name].update(method=operator.method, rows=window.num_rows)
            self.states[name].solver.solution = None
            # The one-read step checks the direction in its read: no eigendecomposition is read back.
            return operator.solve(grad, damping, **check_keyword(not self.route.defers))
        return self.solve_operator(name, operator, grad, damping)

    def solve_operator(self, name: str, operator: Curvature, grad: Tensor, damping: float) -> Tensor | None:
        """One block's solve as :meth:`step` does it: the solver object solves with the block's
        state (choice, warm start, probes) and statistics are recorded. None (with
        ``stats[name]["fallback"]``) keeps the plain gradient."""
        st = self.stats.setdefault(name, {"damping": damping})
        st.setdefault("damping", damping)
        st["rows"] = int(operator.num_rows)
        form = "exact"
        if isinstance(operator, KronRows):  # CG-FAC's own curvature: its damping form, graft check and bound
            form = self.damping_form
            if self.graft == "rmsprop":
                self._check_graft_rows(name, operator)
            bound = operator.trace_tensor()  # tr(A)·tr(G) ≥ the largest eigenvalue of A ⊗ G
            st["curvature_bound"] = bound if self.route.defers else float(bound)
        if form == "factored":
            st["damping_form"] = "factored"
        state = self._state(name).solver
        state.check = not self.route.defers  # the one-read step checks the direction in its read (eigh)
        sol = self.solver_object.solve(operator, grad, damping, state, step=self.steps, form=form)
        st["method"] = sol.method
        st.update(sol.stats)
        if sol.fallback is not None:
            st["fallback"] = sol.fallback
            return None
        return sol.x

    def _check_graft_rows(self, name: str, operator: KronRows) -> None:
        """Warn once when a grafted layer has fewer rows than :data:`GRAFT_MIN_ROWS_SHARE` of its
        smaller side: outside the rows' span the direction is ``∇W/λ``, most of its norm there, and
        RMSProp's length put on it concentrates the step on a few entries (on the wide MLP the
        grafted step's largest entry was 5–60× RMSProp's and training diverged:
        ``benchmarks/graft-diagnosis``)."""
        d_out, d_in = operator.shape
        if operator.num_rows >= GRAFT_MIN_ROWS_SHARE * min(d_in, d_out):
            return
        note = (f"graft='rmsprop' with {operator.num_rows} curvature rows on a {d_out} x {d_in} layer: most of the "
                "direction lies outside the rows' span (grad/damping there) and RMSProp's length on it concentrates "
                "the step on a few entries (it diverged on a wide MLP); use cgfac.optim.CGFAC, whose quadratic model "
                "measures the step along the direction, or more curvature rows")
        self.stats[name]["graft_rows"] = note
        if not self._warned_graft_rows:
            self._warned_graft_rows = True
            warnings.warn(f"cgfac: layer {name!r}: {note}", RuntimeWarning, stacklevel=4)

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
