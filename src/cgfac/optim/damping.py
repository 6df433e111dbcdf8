"""Levenberg–Marquardt adaptation of the damping ``λ`` (Martens & Grosse 2015, §6.5)::

    ρ = (h(θ + δ) − h(θ)) / (M(δ) − M(0)),  M without λ (kfac-jax's default)
    λ ← λ / ω if ρ < 1/4,   λ ← λ · ω if ρ > 3/4,   ω = decay^T,  λ ∈ [low, high]

checked every ``T = interval`` steps; a non-finite ``ρ`` counts as a failure."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LevenbergMarquardt"]


@dataclass(frozen=True)
class LevenbergMarquardt:
    """The rule's constants: ``interval`` (``T``), ``decay`` (``ω = decay^T``), ``low``, ``high``."""

    interval: int
    decay: float
    low: float
    high: float

    @property
    def omega(self) -> float:
        return self.decay ** self.interval

    def due(self, steps: int) -> bool:
        """Whether the step numbered ``steps`` (from 0) ends an interval."""
        return (steps + 1) % self.interval == 0

    def raised(self, damping: float) -> float:
        """``λ / ω``, at most ``high`` (a failed or skipped step)."""
        return min(self.high, damping / self.omega)

    @staticmethod
    def ratio(new_loss: float, old_loss: float, quad_change: float | None) -> float:
        """``ρ``; ``−∞`` where the model predicts no decrease."""
        return (new_loss - old_loss) / quad_change if quad_change is not None and quad_change < 0 else -math.inf

    def adapted(self, damping: float, rho: float) -> float:
        """``λ`` after a check with reduction ratio ``rho``."""
        if not math.isfinite(rho) or rho < 0.25:
            return self.raised(damping)
        if rho > 0.75:
            return max(self.low, damping * self.omega)
        return damping
