"""Grafting: a layer's natural-gradient direction with the step length of RMSProp.

Shampoo's practice (Agarwal et al. 2020, "Disentangling adaptive gradient methods from learning
rates"; Anil et al. 2020): the preconditioner chooses each layer's *direction*, a diagonal
method its *length*. Per block, with ``G = ∇W`` (``d_out × d_in``, bias last column) and its
direction ``X``:

    v ← β₂ v + (1 − β₂) G ⊙ G,        v̂ = v / (1 − β₂ᵗ)      (t: this block's updates)
    X ← X · ‖G / (√v̂ + ε)‖_F / ‖X‖_F

so the step is as long as Adam's without its first moment (the torch optimizer's momentum
supplies that), whatever the curvature's scale, damping or batch size: learning rates carry
over from Adam (SGD with momentum 0.9 sums ≈ 10 gradients, so its ``lr`` is about a tenth of
Adam's). The second moment ``v`` is part of the block's :class:`cgfac.precondition.state.LayerState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RMSPropGraft:
    """The second moment of one block's gradient matrix and its update count."""

    v: Tensor
    steps: int = 0

    @classmethod
    def like(cls, grad: Tensor) -> RMSPropGraft:
        return cls(torch.zeros_like(grad))

    def update(self, grad: Tensor, beta2: float) -> None:
        """``v ← β₂ v + (1 − β₂) G ⊙ G`` (``grad`` in ``v``'s dtype and device)."""
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.steps += 1

    def step_norm(self, grad: Tensor, beta2: float, eps: float) -> Tensor:
        """``‖G / (√v̂ + ε)‖_F``, the length of RMSProp's step (a 0-dim tensor, no host sync)."""
        v_hat = self.v / (1 - beta2 ** max(self.steps, 1))
        return torch.linalg.vector_norm(grad / (v_hat.sqrt() + eps))

    def apply(self, x: Tensor, grad: Tensor, beta2: float, eps: float) -> Tensor:
        """``x`` rescaled in place to RMSProp's step length (a zero ``x`` stays zero); the factor."""
        norm = torch.linalg.vector_norm(x)
        scale = torch.where(norm > 0, self.step_norm(grad, beta2, eps) / norm.clamp_min(torch.finfo(x.dtype).tiny),
                            torch.zeros_like(norm))
        x.mul_(scale)
        return scale

    def state_dict(self) -> dict[str, object]:
        return {"graft_v": self.v, "graft_steps": self.steps}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> RMSPropGraft:
        return cls(state["graft_v"].detach().to(device).clone(), int(state["graft_steps"]))
