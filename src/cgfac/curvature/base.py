"""The declared interface of a layer's damped curvature, the object every solver works on.

A layer's unknown is a matrix ``X`` (``d_out × d_in``, the layer matrix's shape). A curvature is
the symmetric positive semi-definite linear map ``C`` on such matrices; damped, the system a
solver solves is ``(C + λ I) X = ∇W`` (or, for Kronecker curvatures with
``form="factored"``, ``(G + γ_G I) X (A + γ_A I) = ∇W``). Implementations:

* :class:`cgfac.curvature.KronRows`: ``C V = G V A`` from rows (``A = ãᵀã``, ``G = g̃ᵀg̃``), CG-FAC's.
* :class:`cgfac.curvature.KronFactors`: ``C V = G V A`` from explicit factors, e.g. K-FAC's running
  averages (:class:`cgfac.curvature.RunningFactors`).
* :class:`cgfac.curvature.ExactRows`: the exact empirical-Fisher block
  ``C = (1/n) Σ_s vec(J_s) vec(J_s)ᵀ``.

Blocks with a closed-form solve of their own (embeddings' diagonal input factor, normalisation
layers' per-feature blocks) are :class:`DirectCurvature`: ``solve(grad, λ)`` and ``method``.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor


def check_exact_form(form: str) -> None:
    """Only Kronecker curvatures have a factored damping: ``ValueError`` unless ``form="exact"``."""
    if form != "exact":
        raise ValueError(f"form={form!r}: a factored damping needs a Kronecker curvature; this block takes 'exact'")


@runtime_checkable
class Curvature(Protocol):
    """A layer's curvature ``C`` as products; what CG, low-rank and eigen solvers accept.

    ``kind`` names the cost table of :mod:`cgfac.solvers.cost` (``"kron"``, ``"exact"``; others have none
    and are solved only by a forced solver). ``num_rows``/``num_samples``: the rows ``r`` and
    samples ``n`` it was built from (for cost models); ``row_counts``: the rows of each side
    ``(r_a, r_g)``. ``supports_lowrank``: whether :meth:`solve_lowrank` (an exact solve through the
    rows' low rank) is available. ``form``: ``"exact"`` (``C + λI``) or, for Kronecker curvatures,
    ``"factored"`` (``(G + γ_G I) ⊗ (A + γ_A I)``); a block without a factored form raises
    ``ValueError`` for it.
    """

    kind: ClassVar[str]
    supports_lowrank: ClassVar[bool]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``: the shape of ``X`` and ``∇W``."""
        ...

    @property
    def num_rows(self) -> int: ...

    @property
    def num_samples(self) -> int: ...

    @property
    def row_counts(self) -> tuple[int, int]:
        """``(r_a, r_g)``: the rows of the input and output sides (both ``num_rows`` for a block
        that is not a Kronecker product)."""
        ...

    def matvec(self, v: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``C V + λ V`` for a ``d_out × d_in`` matrix ``V``."""
        ...

    def jacobi(self, damping: float, form: str = "exact") -> Tensor | None:
        """The diagonal of ``C + λI`` as a ``d_out × d_in`` matrix, or None when too costly."""
        ...

    def solve_lowrank(self, grad: Tensor, damping: float, form: str = "exact", *, check: bool = True) -> Tensor:
        """``X`` of the damped system, exactly, through the rows' low rank (``NotImplementedError``
        where ``supports_lowrank`` is False). ``check=False``: an eigendecomposition it takes need
        not read its result back to check it (:func:`cgfac.curvature.eigh`; the caller checks ``X``)."""
        ...

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """Explicit Kronecker factors ``(A, G)`` with ``C V = G V A``, or None (not a Kronecker product)."""
        ...

    def mean_diagonal(self) -> float:
        """``tr(C)/(d_out·d_in)``, the scale of ``damping_scale="relative"``."""
        ...


@runtime_checkable
class Scaled(Protocol):
    """What ``damping_scale`` reads from any block (curvature or decomposition): ``tr(C)/(d_out·d_in)``."""

    def mean_diagonal(self) -> float: ...


@runtime_checkable
class RankBounded(Scaled, Protocol):
    """A block that bounds its rank (built from few rows): ``damping_scale="rank"`` divides its
    trace by the bound instead of ``d_out·d_in``."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def rank_bound(self) -> int: ...


@runtime_checkable
class DeviceTraced(RankBounded, Protocol):
    """A block whose trace is a 0-dim device tensor (no host read): the one-read step scales its
    damping on the device."""

    def trace_tensor(self) -> Tensor: ...


@runtime_checkable
class DirectCurvature(Protocol):
    """A block solved in closed form: ``X = (C + λI)⁻¹ ∇W`` by ``solve``; ``method`` names it.
    ``check=False``: an eigendecomposition it takes need not read its result back to check it
    (:func:`cgfac.curvature.eigh`; the caller checks ``X``)."""

    method: str

    def solve(self, grad: Tensor, damping: float, *, check: bool = True) -> Tensor: ...


class RowBlock:
    """Shape of a block held as rows ``a`` (``r × d_in``) and ``g`` (``r_g × d_out``): shared by
    :class:`~cgfac.curvature.KronRows` and :class:`~cgfac.curvature.ExactRows`."""

    a: Tensor
    g: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer matrix."""
        return self.g.shape[1], self.a.shape[1]

    @property
    def num_rows(self) -> int:
        return self.a.shape[0]

    @property
    def row_counts(self) -> tuple[int, int]:
        """``(r_a, r_g)``: the rows of ``a`` and of ``g``."""
        return self.a.shape[0], self.g.shape[0]

