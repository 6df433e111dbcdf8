"""K-FAC's curvature state: running averages of a layer's per-batch factors.

Each update folds a batch's factors in, ``F ← δ F + (1 − δ) F_batch`` for every factor (dense
layers: ``A`` and ``G``; embeddings: ``diag(A)`` and ``G``; normalisation layers: the per-feature
blocks), with ``δ = ρ`` (``warmup="first"``: the first batch initialises them) or
``δ = min(ρ, 1 − 1/(t + 1))`` at the ``t``-th update (``warmup="mean"``, kfac-jax: the early
factors are the plain mean of the batches seen). Dense factors are a
:class:`~cgfac.curvature.kron.KronFactors` curvature (:meth:`RunningFactors.operator`), which
CG-FAC's solvers accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cgfac.curvature.kron import KronFactors


class RunningFactors:
    """The running factors of one layer and how many batches were folded in."""

    def __init__(self, warmup: str = "first") -> None:
        self.warmup = warmup
        self.tensors: tuple[Tensor, ...] | None = None
        self.updates = 0

    def __bool__(self) -> bool:
        return self.tensors is not None

    def decay(self, rho: float) -> float:
        """``δ`` of the next update (see the module docstring)."""
        return min(rho, 1 - 1 / (self.updates + 1)) if self.warmup == "mean" else rho

    def update(self, new: Sequence[Tensor], rho: float) -> None:
        """Fold one batch's factors in (in place after the first)."""
        decay = self.decay(rho)
        if self.tensors is None:
            self.tensors = tuple(new)
        else:
            self.tensors = tuple(old.mul_(decay).add_(f, alpha=1 - decay) for old, f in zip(self.tensors, new))
        self.updates += 1

    def operator(self) -> KronFactors:
        """The dense Kronecker curvature ``G V A`` of the running ``(A, G)``."""
        if self.tensors is None or len(self.tensors) != 2 or self.tensors[0].dim() != 2:
            raise ValueError("operator(): only dense (A, G) running factors form a KronFactors curvature")
        return KronFactors(*self.tensors)

    def state_dict(self) -> dict[str, Any]:
        """``factors`` (and ``factor_updates`` with ``warmup="mean"``, which needs the count)."""
        state: dict[str, Any] = {}
        if self.tensors is not None:
            state["factors"] = self.tensors
            if self.warmup == "mean":
                state["factor_updates"] = self.updates
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.tensors = None
        self.updates = 0
        if "factors" in state:
            self.tensors = tuple(t.to(device).clone() for t in state["factors"])
            # saved with warmup="first": at least one batch was folded in
            self.updates = state.get("factor_updates", 1)
