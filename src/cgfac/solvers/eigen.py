"""Explicit Kronecker factors, eigendecomposed: ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ``,

    X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ

(factored damping: ``⊘ ((s_G + γ_G)(s_A + γ_A)ᵀ)``; :class:`cgfac.curvature.KronEigen`). Any curvature
with explicit factors (``factors()``): CG-FAC's rows (formed, ``O(r d²)``) or K-FAC's running
factors. Cost (``p = d_in·d_out``)::

    kron    r_a d_in² + r_g d_out² + c_eig (d_in³ + d_out³) + 2p (d_in + d_out) + o_call

K-FAC's solve is this solver with a refresh period (:class:`PeriodicEigenSolver`): each layer's
decomposition of its running factors is kept and recomputed every ``inv_update_steps`` steps. How a
block type's factors are formed and decomposed is its :class:`FactorKind` (dense Kronecker blocks:
:class:`KronFactorKind`, through :meth:`EigenSolver.decompose`; a layer type with its own structure
registers one, :func:`register_factor_kind`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from cgfac.curvature.kron import KronEigen, KronFactors, KronRows
from cgfac.solvers.base import DecomposingSolver, Decomposition, SolverState

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature
    from cgfac.rows import Rows
    from cgfac.solvers.base import CostConstants


class EigenSolver(DecomposingSolver):
    """Form the factors, eigendecompose both, solve (K-FAC's solve, every step)."""

    name: ClassVar[str] = "eigen"
    kinds: ClassVar[tuple[str, ...]] = ("kron", "kron-factors")
    auto_candidate: ClassVar[bool] = True

    @staticmethod
    def kron_cost(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float:
        p = d_in * d_out
        return r_a * d_in**2 + r_g * d_out**2 + c.c_eig * (d_in**3 + d_out**3) + 2 * p * (d_in + d_out) + c.o_call

    def decompose(self, op: Curvature, *, check: bool = True) -> KronEigen:
        """The eigendecomposition of ``op``'s factors (K-FAC keeps it for ``inv_update_steps``);
        ``check``: whether it reads its result back to check it (:func:`cgfac.curvature.eigh`)."""
        factors = op.factors()
        if factors is None:
            raise ValueError(f"the eigen solver needs explicit Kronecker factors; curvature kind {op.kind!r} has none")
        return KronEigen.from_factors(*factors, check=check)

    def direct(self, op: Curvature, grad: Tensor, damping: float, form: str = "exact", *,
               check: bool = True) -> Tensor:
        return self.decompose(op, check=check).solve(grad, damping, form=form)


class FactorKind(ABC):
    """How K-FAC keeps one block type's factors: this batch's factors from its rows, zeros shaped
    like them (a rank without rows joins the all-reduce with these), their decomposition
    (:meth:`decompose`, refreshed by :class:`PeriodicEigenSolver`), its rebuild from its ``tensors()``
    (checkpoints, broadcasts), zero tensors shaped like those (broadcast buffers) and its cost (the
    owners' assignment). One kind per block structure (a layer helper's ``structure``), chosen by
    :func:`factor_kind`; a layer type with a structure of its own registers its kind
    (:func:`register_factor_kind`). ``form``: the Kronecker block's form (:mod:`cgfac.precondition.memory`):
    ``"dense"``, ``"diag-in"``, ``"diag-out"`` or ``"diag"``."""

    def __init__(self, d_in: int, d_out: int, form: str = "dense") -> None:
        self.d_in, self.d_out, self.form = d_in, d_out, form

    @property
    def diagonal(self) -> tuple[bool, bool]:
        """Which sides, ``(in, out)``, are kept as diagonal factors (``form``)."""
        return self.form in ("diag-in", "diag"), self.form in ("diag-out", "diag")

    @abstractmethod
    def batch_factors(self, rows: Rows) -> tuple[Tensor, ...]:
        """This batch's factors (averaged over ranks by weight ``n``)."""

    @abstractmethod
    def zero_factors(self, like: Tensor) -> tuple[Tensor, ...]:
        """Zeros shaped like :meth:`batch_factors` (``like``: a tensor of the dtype and device)."""

    @abstractmethod
    def decompose(self, factors: Sequence[Tensor]) -> Decomposition:
        """The kept decomposition of the running factors."""

    @abstractmethod
    def rebuild(self, tensors: Sequence[Tensor]) -> Decomposition:
        """:meth:`decompose`'s result from its ``tensors()``."""

    @abstractmethod
    def empty_tensors(self, factors: Sequence[Tensor]) -> list[Tensor]:
        """Zero tensors shaped like ``decompose(factors).tensors()`` (broadcast buffers)."""

    @abstractmethod
    def cost(self) -> float:
        """The decomposition's cost, for assigning layers to owner ranks."""


class KronFactorKind(FactorKind):
    """Dense Kronecker blocks (structure ``"kron"``): ``(A, G)``, a diagonal side (``form``) the 1-D
    diagonal of its factor, never formed whole; decomposed by :meth:`EigenSolver.decompose`."""

    def batch_factors(self, rows: Rows) -> tuple[Tensor, ...]:
        return KronRows.from_rows([rows], [1.0]).factors(self.diagonal)

    def zero_factors(self, like: Tensor) -> tuple[Tensor, ...]:
        diag_in, diag_out = self.diagonal
        return (like.new_zeros(self.d_in) if diag_in else like.new_zeros(self.d_in, self.d_in),
                like.new_zeros(self.d_out) if diag_out else like.new_zeros(self.d_out, self.d_out))

    def decompose(self, factors: Sequence[Tensor]) -> KronEigen:
        a_factor, g_factor = factors
        return EigenSolver().decompose(KronFactors(a_factor, g_factor))

    def rebuild(self, tensors: Sequence[Tensor]) -> KronEigen:
        return KronEigen.from_tensors(tensors, self.diagonal)

    def empty_tensors(self, factors: Sequence[Tensor]) -> list[Tensor]:
        a, g = factors
        return KronEigen.empty_tensors(a, g)

    def cost(self) -> float:
        diag_in, diag_out = self.diagonal
        return float((self.d_in if diag_in else self.d_in**3) + (self.d_out if diag_out else self.d_out**3))


_FACTOR_KINDS: dict[str, type[FactorKind]] = {"kron": KronFactorKind}


def register_factor_kind(structure: str, kind: type[FactorKind]) -> type[FactorKind]:
    """K-FAC keeps the factors of blocks of this ``structure`` (a layer helper's) as ``kind``."""
    if not (isinstance(kind, type) and issubclass(kind, FactorKind)):
        raise TypeError(f"register_factor_kind needs a subclass of cgfac.solvers.FactorKind, got {kind!r}")
    _FACTOR_KINDS[structure] = kind
    return kind


def factor_kind(structure: str, d_in: int, d_out: int, form: str = "dense") -> FactorKind:
    """The :class:`FactorKind` of a block of this ``structure``, shape and form: the registered one,
    else the dense Kronecker one (:class:`KronFactorKind`, every block's default)."""
    return _FACTOR_KINDS.get(structure, KronFactorKind)(d_in, d_out, form)


class PeriodicEigenSolver:
    """The eigen solver with a refresh period (K-FAC's solve): each layer's decomposition of its
    running factors (:meth:`FactorKind.decompose`) is kept in its :class:`SolverState` and recomputed
    every ``period`` steps (or when it has none); every step solves with the kept one at the step's
    ``λ``. The refresh and the solve are separate calls, so that a decomposition can be computed on
    one rank and broadcast between them."""

    name: ClassVar[str] = "eigen"

    def __init__(self, period: int = 1) -> None:
        self.period = period

    def due(self, state: SolverState, step: int) -> bool:
        """Whether the layer's decomposition is recomputed at ``step``."""
        return state.decomposition is None or step % self.period == 0

    @staticmethod
    def refresh(kind: FactorKind, factors: Sequence[Tensor]) -> Decomposition:
        """A fresh decomposition of ``factors`` (``torch.linalg.LinAlgError`` where it fails)."""
        return kind.decompose(factors)

    @staticmethod
    def keep(state: SolverState, decomposition: Decomposition) -> None:
        """Keep a fresh decomposition (age 0)."""
        state.decomposition, state.decomposition_age = decomposition, 0

    @staticmethod
    def age(state: SolverState) -> None:
        """A step with the kept decomposition, not refreshed."""
        state.decomposition_age += 1

    @staticmethod
    def solve(state: SolverState, grad: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``X`` from the kept decomposition (``form="factored"``: a :class:`KronEigen`'s factored damping)."""
        decomposition = state.decomposition
        if decomposition is None:
            raise RuntimeError("PeriodicEigenSolver.solve: the layer has no decomposition (refresh it first)")
        if form == "factored":
            if not isinstance(decomposition, KronEigen):
                raise ValueError("form='factored' needs a Kronecker decomposition (KronEigen)")
            return decomposition.solve(grad, damping, form=form)
        return decomposition.solve(grad, damping)
