"""Standard K-FAC: running Kronecker factors, eigendecomposed every few steps.

Every ``factor_update_steps`` steps the factors of each layer are refreshed from this batch's
rows (``cgfac.kron`` scaling) as running averages ``A ← ρ A + (1 − ρ) A_batch`` (likewise
``G``; ``ρ = factor_decay``, the first batch initialises them). Every ``inv_update_steps`` steps
they are eigendecomposed, and every step the direction is ::

    X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ

which solves ``G X A + λX = ∇W`` exactly for the current factors (damping added exactly to the
Kronecker product, not split between the factors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cgfac.base import Preconditioner
from cgfac.hyperparams import Hyper, HyperParam, positive_int
from cgfac.kron import KronEigen, KronRows
from cgfac.layers import LayerHelper


class KFAC(Preconditioner):
    """K-FAC with eigendecomposed factors (see the module docstring).

    Args (beyond :class:`cgfac.base.Preconditioner`'s):
        factor_decay: ρ, the weight of the past in the running factors (0: this batch only).
        factor_update_steps: refresh the factors every this-many steps.
        inv_update_steps: recompute the eigendecompositions every this-many steps.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_decay: Hyper = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        self.factor_decay = HyperParam("factor_decay", factor_decay, low=0.0, high=1.0)
        self.factor_update_steps = positive_int("factor_update_steps", factor_update_steps)
        self.inv_update_steps = positive_int("inv_update_steps", inv_update_steps)
        self.steps = 0
        super().__init__(model, **kwargs)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.eigen: dict[str, KronEigen] = {}
        self.eigen_age: dict[str, int] = {}

    def _wants_rows(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def _update_factors(self, name: str, helper: LayerHelper) -> str | None:
        """Fold this step's rows into the running factors; a reason string if they were unusable."""
        rows = self._rows(helper)
        if rows is None:
            return None if name in self.factors else self._no_rows_reason()
        a_new, g_new = KronRows.from_rows([rows], [1.0]).factors()
        if not (a_new.isfinite().all() and g_new.isfinite().all()):
            return "non-finite curvature rows (factor update skipped)"
        if name not in self.factors:
            self.factors[name] = (a_new, g_new)
        else:
            rho = self.factor_decay(self.steps)
            a_old, g_old = self.factors[name]
            self.factors[name] = (a_old.mul_(rho).add_(a_new, alpha=1 - rho),
                                  g_old.mul_(rho).add_(g_new, alpha=1 - rho))
        return None

    def _direction(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        if self._wants_rows():
            problem = self._update_factors(name, helper)
            if problem is not None:
                if name not in self.factors:
                    self.stats[name]["fallback"] = problem
                    return None
                self.stats[name]["factor_update"] = problem
        helper.chunks = []
        if name not in self.eigen or self.steps % self.inv_update_steps == 0:
            try:
                self.eigen[name] = KronEigen.from_factors(*self.factors[name])
                self.eigen_age[name] = 0
            except torch.linalg.LinAlgError as err:
                if name not in self.eigen:
                    raise
                self.stats[name]["decomposition_error"] = f"{err} (previous decomposition kept)"
                self.eigen_age[name] += 1
        else:
            self.eigen_age[name] += 1
        self.stats[name].update(method="eigen", decomposition_age=self.eigen_age[name])
        return self.eigen[name].solve(grad, damping)

    def _layer_state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if name in self.factors:
            state["factors"] = self.factors[name]
        if name in self.eigen:
            e = self.eigen[name]
            state["eigen"] = (e.s_a, e.q_a, e.s_g, e.q_g)
            state["eigen_age"] = self.eigen_age[name]
        return state

    def _load_layer_state(self, name: str, state: dict[str, Any], device: torch.device) -> None:
        self.factors.pop(name, None)
        self.eigen.pop(name, None)
        if "factors" in state:
            self.factors[name] = tuple(t.to(device).clone() for t in state["factors"])
        if "eigen" in state:
            self.eigen[name] = KronEigen(*(t.to(device).clone() for t in state["eigen"]))
            self.eigen_age[name] = state["eigen_age"]
