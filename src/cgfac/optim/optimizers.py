"""The optimizers that own the update: :class:`KFAC` and :class:`CGFAC` (a preconditioner built from
the keywords that are not :class:`~cgfac.optim.SecondOrderOptimizer`'s, under the quadratic-model step)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from cgfac.optim.base import SecondOrderOptimizer
from cgfac.precondition.cgfac import CGFAC as CGFACPreconditioner
from cgfac.precondition.kfac import KFAC as KFACPreconditioner

__all__ = ["CGFAC", "KFAC", "WIDE_DEFAULTS"]

# The keywords of SecondOrderOptimizer; every other keyword goes to the preconditioner.
OPTIMIZER_ARGS = tuple(name for name in inspect.signature(SecondOrderOptimizer.__init__).parameters
                       if name not in ("self", "model", "preconditioner"))


def split_keywords(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` as the optimizer's keywords and the preconditioner's."""
    opt = {k: v for k, v in kwargs.items() if k in OPTIMIZER_ARGS}
    pre = {k: v for k, v in kwargs.items() if k not in OPTIMIZER_ARGS}
    return opt, pre


class KFAC(SecondOrderOptimizer):
    """K-FAC that owns the update: :class:`cgfac.KFAC` directions, the quadratic-model step and
    momentum, Levenberg–Marquardt damping (see the module docstring).

    ``cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=1e-2)``; every keyword of
    :class:`SecondOrderOptimizer` (``lr``, ``momentum``, ``adaptive``, ...) and of
    :class:`cgfac.KFAC` (``damping`` — the initial λ —, ``factor_decay``, ``inv_update_steps``,
    ``fisher``, ...) is accepted. ``kl_clip`` defaults to None: the quadratic model sets the step.
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-2, kl_clip: float | None = None,
                 **kwargs: Any) -> None:
        opt, pre = split_keywords(kwargs)
        super().__init__(model, KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, **pre), **opt)


class CGFAC(SecondOrderOptimizer):
    """CG-FAC that owns the update: :class:`cgfac.CGFAC` directions (warm-started CG, low-rank or
    eigen solves chosen per layer as ``λ`` moves), the quadratic-model step and momentum,
    Levenberg–Marquardt damping (see the module docstring). Keywords as :class:`KFAC`'s, with
    :class:`cgfac.CGFAC`'s (``curvature``, ``solver``, ``curvature_window``, ...)."""

    def __init__(self, model: nn.Module, *, damping: float = 1e-2, kl_clip: float | None = None,
                 **kwargs: Any) -> None:
        opt, pre = split_keywords(kwargs)
        super().__init__(model, CGFACPreconditioner(model, damping=damping, kl_clip=kl_clip, **pre), **opt)

    @classmethod
    def wide(cls, model: nn.Module, *, loss_type: str, **overrides: Any) -> CGFAC:
        """CG-FAC configured for wide layers (:data:`WIDE_DEFAULTS`, any keyword overrides them):
        128 curvature rows per step whatever the batch (the true Fisher sampled on those samples
        alone), the exact low-rank solve of this step's rows (QR of the rows, ``r × r``
        eigendecompositions; no warm start kept), factored damping adapted by the LM rule from
        ``λ₀ = 0.1``, the quadratic model on 128 other samples of the batch (its last). Tuned on the ×4 autoencoder
        (``benchmarks/tuning-autoencoder-wide``), where it trains fastest per second."""
        return cls(model, loss_type=loss_type, **{**WIDE_DEFAULTS, **overrides})


WIDE_DEFAULTS: dict[str, Any] = {
    "curvature_samples": 128, "curvature_window": 1, "solver": "lowrank", "damping_form": "factored",
    "fisher": "true", "damping": 0.1, "min_damping": 1e-3, "quad_samples": 128,
}
"""The settings of :meth:`CGFAC.wide` (the tuned ×4 autoencoder's)."""

