"""Targets sampled from the model's predictive distribution, for the true Fisher of K-FAC.

The true Fisher replaces the data labels by labels ``ŷ ~ p(y | x, θ)`` drawn from the model's
own output distribution; back-propagating the loss of ``ŷ`` gives output gradients ``g`` whose
second moments are the Fisher. Each loss is a per-row negative log-likelihood (rows: every
leading position of ``outputs``; last dimension: classes or features), averaged over rows:

* ``"cross_entropy"``: logits, ``ŷ ~ Categorical(softmax(outputs))``.
* ``"gaussian"`` (alias ``"mse"``): means, ``ŷ ~ N(outputs, I)``, loss ``½‖ŷ − outputs‖²``.
* ``"bernoulli"``: logits, ``ŷ ~ Bernoulli(sigmoid(outputs))``, binary cross-entropy summed
  over the last dimension.

The likelihoods themselves are the classes of :mod:`cgfac.losses`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cgfac.losses import LOSS_TYPES, likelihood

__all__ = ["LOSS_TYPES", "sample_targets", "sampled_loss"]


def _rows(outputs: Tensor) -> Tensor:
    out = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    return out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)


@torch.no_grad()
def sample_targets(outputs: Tensor, loss_type: str, generator: torch.Generator | None = None) -> Tensor:
    """Targets ``ŷ ~ p(y | outputs)``, one per row (class indices for ``"cross_entropy"``, else
    shaped like the rows of ``outputs``)."""
    return likelihood(loss_type).sample(_rows(outputs).detach(), generator)


def sampled_loss(outputs: Tensor, loss_type: str, generator: torch.Generator | None = None,
                 targets: Tensor | None = None) -> Tensor:
    """Mean over rows of the negative log-likelihood of targets sampled from ``outputs`` (or of
    the given ``targets``, as :func:`sample_targets` returns them)."""
    model = likelihood(loss_type)
    out = _rows(outputs)
    target = sample_targets(outputs, loss_type, generator) if targets is None else targets.to(out.device)
    if target.shape[0] != out.shape[0]:
        raise ValueError(f"targets: {target.shape[0]} rows for {out.shape[0]} output rows")
    return model.nll(out, target)
