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


def _rows(outputs: Tensor) -> Tensor:
    out = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    return out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)


@torch.no_grad()
def sample_targets(outputs: Tensor, loss_type: str, generator: torch.Generator | None = None) -> Tensor:
    """Targets ``ŷ ~ p(y | outputs)``, one per row (class indices for ``"cross_entropy"``, else
    shaped like the rows of ``outputs``)."""
    out = _rows(outputs).detach()
    if loss_type == "cross_entropy":
        return torch.multinomial(torch.softmax(out, dim=-1), 1, generator=generator)[:, 0]
    if loss_type in ("gaussian", "mse"):
        return out + torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    if loss_type == "bernoulli":
        return torch.bernoulli(torch.sigmoid(out), generator=generator)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def sampled_loss(outputs: Tensor, loss_type: str, generator: torch.Generator | None = None,
                 targets: Tensor | None = None) -> Tensor:
    """Mean over rows of the negative log-likelihood of targets sampled from ``outputs`` (or of
    the given ``targets``, as :func:`sample_targets` returns them)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    out = _rows(outputs)
    target = sample_targets(outputs, loss_type, generator) if targets is None else targets.to(out.device)
    if target.shape[0] != out.shape[0]:
        raise ValueError(f"targets: {target.shape[0]} rows for {out.shape[0]} output rows")
    if loss_type == "cross_entropy":
        return F.cross_entropy(out, target)
    if loss_type == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, target.to(out.dtype), reduction="none").sum(-1).mean()
    return 0.5 * (out - target.to(out.dtype)).pow(2).sum(-1).mean()
