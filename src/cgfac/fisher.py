"""Targets sampled from the model's predictive distribution, for the true Fisher of K-FAC.

The true Fisher replaces the data labels by labels ``ŷ ~ p(y | x, θ)`` drawn from the model's
own output distribution; back-propagating the loss of ``ŷ`` gives output gradients ``g`` whose
second moments are the Fisher. Each loss is a per-row negative log-likelihood (rows: every
leading position of ``outputs``; last dimension: classes or features), averaged over rows:

* ``"cross_entropy"``: logits, ``ŷ ~ Categorical(softmax(outputs))``.
* ``"gaussian"`` (alias ``"mse"``): means, ``ŷ ~ N(outputs, I)``, loss ``½‖ŷ − outputs‖²``.
* ``"bernoulli"``: logits, ``ŷ ~ Bernoulli(sigmoid(outputs))``, binary cross-entropy summed
  over the last dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cgfac.options import LossType, values

LOSS_TYPES = values(LossType)


def sampled_loss(outputs: Tensor, loss_type: str, generator: torch.Generator | None = None) -> Tensor:
    """Mean over rows of the negative log-likelihood of targets sampled from ``outputs``."""
    out = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    out = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)
    with torch.no_grad():
        if loss_type == "cross_entropy":
            probs = torch.softmax(out.detach(), dim=-1)
            target = torch.multinomial(probs, 1, generator=generator)[:, 0]
        elif loss_type in ("gaussian", "mse"):
            noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
            target = out.detach() + noise
        elif loss_type == "bernoulli":
            probs = torch.sigmoid(out.detach())
            target = torch.bernoulli(probs, generator=generator)
        else:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "cross_entropy":
        return F.cross_entropy(out, target)
    if loss_type == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(-1).mean()
    return 0.5 * (out - target).pow(2).sum(-1).mean()
