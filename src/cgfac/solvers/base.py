"""The solver interface: how a layer's damped system ``(C + λI) X = ∇W`` is solved.

A solver is one object per method. It says which curvatures it can solve (:meth:`Solver.supports`),
what a solve would cost (:meth:`Solver.cost`, in multiply-adds of a large square matrix product,
the unit of :mod:`cgfac.solvers.cost`) and solves (:meth:`Solver.solve`), reading and updating the
layer's :class:`SolverState` (warm start, measured iteration counts, probes) so that a solver
object itself is shared by every layer and holds only settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cgfac.config import HyperParam
    from cgfac.curvature import Curvature


@dataclass(frozen=True)
class CostConstants:
    """Measured conversion factors into square-matmul multiply-adds (see the module docstring)."""

    c_eig: float
    c_solve: float
    c_qr: float
    thin: float
    o_iter: float
    o_call: float

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


@dataclass
class SolverSettings:
    """What a preconditioner's constructor says about solves; solver factories read what they need."""

    cg_max_iters: int = 50
    cg_tol: HyperParam | float = 1e-3
    warm_start: bool = True
    jacobi: bool = True


@runtime_checkable
class Decomposition(Protocol):
    """A kept factorisation of a layer's curvature (K-FAC's eigenpairs :class:`cgfac.curvature.KronEigen`,
    a layer type's own): a solve at any ``λ``, its scale for ``damping_scale``, and the tensors a
    checkpoint keeps (the block's :class:`cgfac.solvers.FactorKind` rebuilds it from them)."""

    def solve(self, grad: Tensor, damping: float) -> Tensor: ...

    def mean_diagonal(self) -> float: ...

    def tensors(self) -> tuple[Tensor, ...]: ...


@dataclass
class SolverState:
    """One layer's memory between steps (kept in checkpoints by :meth:`state_dict`).

    ``solution``: the last direction, CG's warm start. ``last_iters``: CG's products measured at
    the layer, at the damping ``iters_damping``. ``probed_at``: the step of the last CG probe;
    ``probe_budget``: a pending probe's ``(products, alternative method)``. ``decomposition``:
    a kept decomposition (K-FAC's eigenpairs, refreshed every ``inv_update_steps``; any object with
    ``solve(grad, λ)`` and ``tensors()``), ``decomposition_age`` steps old. ``check``: whether this
    solve's eigendecompositions read their results back to check them (:func:`cgfac.curvature.eigh`);
    the preconditioner sets it before each solve, False in CG-FAC's one-read step, which checks the
    direction instead (:class:`cgfac.precondition.strategies.SingleProcess`). Not saved.
    """

    solution: Tensor | None = None
    last_iters: int | None = None
    iters_damping: float | None = None
    probed_at: int | None = None
    probe_budget: tuple[int, str] | None = None
    decomposition: Decomposition | None = None
    decomposition_age: int = 0
    check: bool = True

    SAVED: ClassVar[tuple[str, ...]] = ("solution", "last_iters", "iters_damping", "probed_at")

    def state_dict(self) -> dict[str, Any]:
        """The saved fields that are set (tensors referenced, as in ``torch.optim``); a decomposition
        as ``eigen`` (its ``tensors()``) and ``eigen_age``."""
        state = {key: getattr(self, key) for key in self.SAVED if getattr(self, key) is not None}
        if self.decomposition is not None:
            state["eigen"] = tuple(self.decomposition.tensors())
            state["eigen_age"] = self.decomposition_age
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device,
                        rebuild: Callable[[list[Tensor]], Decomposition] | None = None) -> None:
        """Restore a :meth:`state_dict` onto ``device``; ``rebuild`` turns saved ``eigen`` tensors
        back into a decomposition."""
        for key in self.SAVED:
            value = state.get(key)
            setattr(self, key, value.to(device).clone() if isinstance(value, Tensor) else value)
        self.probe_budget = None
        self.decomposition, self.decomposition_age = None, 0
        if "eigen" in state and rebuild is not None:
            self.decomposition = rebuild([t.to(device).clone() for t in state["eigen"]])
            self.decomposition_age = state["eigen_age"]


@dataclass
class Solution:
    """A solve's direction (None: keep the plain gradient, ``fallback`` says why), the method that
    produced it and its statistics (for :meth:`cgfac.precondition.base.Preconditioner.layer_stats`)."""

    x: Tensor | None
    method: str
    stats: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None
    converged: bool = True


def form_keyword(form: str) -> dict[str, str]:
    """``form=`` for a curvature's products only where it is not the default ``"exact"`` (a curvature
    written before the keyword existed keeps working with exact damping)."""
    return {} if form == "exact" else {"form": form}


def check_keyword(check: bool) -> dict[str, bool]:
    """``check=`` for a curvature's solve only where it is not the default True (a curvature written
    without the keyword keeps working, its eigendecompositions, if any, checked)."""
    return {} if check else {"check": False}


class Solver(ABC):
    """One solve method. Subclasses set ``name`` (the ``solver=`` string), ``kinds`` (the curvature
    kinds it solves, checked at construction) and ``auto_candidate`` (whether ``solver="auto"``
    weighs it; it then needs a cost formula for each kind in ``kinds``)."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("kron", "exact")
    auto_candidate: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: SolverSettings) -> Solver:
        """The solver a preconditioner with these settings uses (default: no settings needed)."""
        return cls()

    def supports(self, op: Curvature) -> bool:
        """Whether this solver can solve the curvature ``op`` (default: its ``kind`` is one of ``kinds``)."""
        return op.kind in self.kinds

    def cost(self, op: Curvature, k: int, constants: CostConstants) -> float | None:
        """Predicted multiply-adds of one solve of ``op`` (``k``: CG products), None without a model."""
        d_out, d_in = op.shape
        if op.kind == "kron":
            r_a, r_g = op.row_counts
            return self.kron_cost(r_a, r_g, d_in, d_out, k, constants)
        if op.kind == "exact":
            return self.exact_cost(op.num_rows, op.num_samples, d_in, d_out, k, constants)
        return None

    @staticmethod
    def kron_cost(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float | None:
        """Cost on ``G X A + λX`` from ``r_a``, ``r_g`` rows (None: no model)."""
        return None

    @staticmethod
    def exact_cost(rows: int, n: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float | None:
        """Cost on the exact block of ``rows`` rows and ``n`` samples (None: no model)."""
        return None

    @abstractmethod
    def solve(self, op: Curvature, grad: Tensor, damping: float, state: SolverState, *, step: int = 0,
              form: str = "exact") -> Solution:
        """Solve ``(C + λI) X = ∇W`` (``form="factored"``: ``(G + γ_G I) X (A + γ_A I) = ∇W``)."""


class DirectSolver(Solver):
    """A solver without iterations: :meth:`direct` computes ``X``; no warm start is kept."""

    @abstractmethod
    def direct(self, op: Curvature, grad: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``X`` of the damped system."""

    def solve(self, op: Curvature, grad: Tensor, damping: float, state: SolverState, *, step: int = 0,
              form: str = "exact") -> Solution:
        state.solution = None
        return Solution(self.direct(op, grad, damping, form), self.name)


class DecomposingSolver(DirectSolver):
    """A direct solver through eigendecompositions: :meth:`direct` takes ``check`` (whether they read
    their results back to check them, :func:`cgfac.curvature.eigh`), the layer's ``state.check``."""

    @abstractmethod
    def direct(self, op: Curvature, grad: Tensor, damping: float, form: str = "exact", *,
               check: bool = True) -> Tensor:
        """``X`` of the damped system."""

    def solve(self, op: Curvature, grad: Tensor, damping: float, state: SolverState, *, step: int = 0,
              form: str = "exact") -> Solution:
        state.solution = None
        return Solution(self.direct(op, grad, damping, form, check=state.check), self.name)
