"""Exact solves through the rows' low rank: an ``r × r`` Gram per Kronecker factor, or Woodbury on the exact block.

Kronecker rows (:meth:`cgfac.curvature.KronRows.solve_lowrank`): the at most ``r`` non-zero
eigenpairs of each factor from its rows' ``r × r`` Gram matrix, its eigendecomposition and the
basis ``U = aᵀV`` (:func:`cgfac.curvature.factor_basis`; or the ``d × d`` factor when ``r ≥ d``).
Exact block (:meth:`cgfac.curvature.ExactRows.solve_lowrank`):
Woodbury through the ``n × n`` Gram matrix of per-sample gradients. Costs
(``p = d_in·d_out``, ``q_a = min(r_a, d_in)``, ``q_g = min(r_g, d_out)``)::

    kron    Σ_sides [2 r² d + c_eig r³  if r < d  else  r d² + c_eig d³]
            + (q_g + q_a) p + q_g q_a (d_in + d_out) + o_call
    exact   min(r² (d_in + d_out), r p + n² p) + 2 r p + c_solve n³ + o_call
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from cgfac.solvers.base import DecomposingSolver, check_keyword, form_keyword

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature
    from cgfac.solvers.base import CostConstants


def factor_cost(rows: int, width: int, c: CostConstants) -> float:
    """Eigenpairs of one factor: the rows' ``r × r`` Gram, its eigh and the basis ``aᵀV``, or the ``d × d`` factor."""
    if rows < width:
        return 2 * rows**2 * width + c.c_eig * rows**3
    return rows * width**2 + c.c_eig * width**3


class LowRankSolver(DecomposingSolver):
    """The exact low-rank solve of Kronecker rows, Woodbury on the exact block."""

    name: ClassVar[str] = "lowrank"
    kinds: ClassVar[tuple[str, ...]] = ("kron", "exact")
    auto_candidate: ClassVar[bool] = True

    def supports(self, op: Curvature) -> bool:
        return op.supports_lowrank

    @staticmethod
    def kron_cost(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float:
        p = d_in * d_out
        q_a, q_g = min(r_a, d_in), min(r_g, d_out)
        return factor_cost(r_a, d_in, c) + factor_cost(r_g, d_out, c) + (q_g + q_a) * p \
            + q_g * q_a * (d_in + d_out) + c.o_call

    @staticmethod
    def exact_cost(rows: int, n: int, d_in: int, d_out: int, k: int, c: CostConstants) -> float:
        p = d_in * d_out
        return min(rows**2 * (d_in + d_out), rows * p + n * n * p) + 2 * rows * p + c.c_solve * n**3 + c.o_call

    def direct(self, op: Curvature, grad: Tensor, damping: float, form: str = "exact", *,
               check: bool = True) -> Tensor:
        keywords: dict[str, Any] = {**form_keyword(form), **check_keyword(check)}  # only the non-defaults
        return op.solve_lowrank(grad, damping, **keywords)
