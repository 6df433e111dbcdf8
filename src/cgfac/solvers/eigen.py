"""Explicit Kronecker factors, eigendecomposed: ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ``,

    X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ

(factored damping: ``⊘ ((s_G + γ_G)(s_A + γ_A)ᵀ)``; :class:`cgfac.curvature.KronEigen`). Any curvature
with explicit factors (``factors()``): CG-FAC's rows (formed, ``O(r d²)``) or K-FAC's running
factors. Cost (``p = d_in·d_out``)::

    kron    r_a d_in² + r_g d_out² + c_eig (d_in³ + d_out³) + 2p (d_in + d_out) + o_call
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from cgfac.curvature.kron import KronEigen
from cgfac.solvers.base import DecomposingSolver

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature
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
