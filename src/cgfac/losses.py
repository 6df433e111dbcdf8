"""The likelihoods of the losses the library knows, one class each (:data:`LIKELIHOODS`).

A loss is a per-row negative log-likelihood (rows: every leading position of the outputs ``z``;
last dimension: classes or features), averaged over rows. Each :class:`Likelihood` gives what the
library needs of it: targets sampled from the model's distribution ``ŷ ~ p(y | z)`` (the true
Fisher, :func:`sample_targets`), the negative log-likelihood of given targets, and the products
``uᵀ H w`` with ``H`` the Hessian of the loss in ``z`` (the exact GGN of the quadratic model,
:mod:`cgfac.optim.quadratic`):

* ``"cross_entropy"`` (:class:`CrossEntropy`): logits, ``ŷ ~ Categorical(softmax(z))``,
  ``H = diag(p) − ppᵀ``.
* ``"bernoulli"`` (:class:`Bernoulli`): logits, ``ŷ ~ Bernoulli(σ(z))``, binary cross-entropy summed
  over the last dimension, ``H = diag(p(1 − p))``.
* ``"gaussian"`` (alias ``"mse"``, :class:`Gaussian`): means, ``ŷ ~ N(z, I)``, loss ``½‖ŷ − z‖²``
  summed over the last dimension, ``H = I``.

The true Fisher replaces the data labels by labels ``ŷ ~ p(y | x, θ)`` drawn from the model's
own output distribution (:func:`sample_targets`); back-propagating the loss of ``ŷ``
(:func:`sampled_loss`) gives output gradients ``g`` whose second moments are the Fisher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cgfac.config import LossType, values

__all__ = ["LIKELIHOODS", "LOSS_TYPES", "Bernoulli", "CrossEntropy", "Gaussian", "Likelihood", "likelihood",
           "sample_targets", "sampled_loss"]

LOSS_TYPES = values(LossType)


class Likelihood:
    """A loss's likelihood; ``rows`` are ``z`` as ``rows × classes`` (or features)."""

    def sample(self, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        """Targets ``ŷ ~ p(y | z)``, one per row."""
        raise NotImplementedError

    def nll(self, rows: Tensor, targets: Tensor) -> Tensor:
        """The mean over rows of the negative log-likelihood of ``targets``."""
        raise NotImplementedError

    def hessian_form(self, z: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """``Σ_rows uᵀ H w`` at the rows ``z`` (all three ``rows × classes``, float64)."""
        raise NotImplementedError


class CrossEntropy(Likelihood):
    def sample(self, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.multinomial(torch.softmax(rows, dim=-1), 1, generator=generator)[:, 0]

    def nll(self, rows: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(rows, targets)

    def hessian_form(self, z: Tensor, u: Tensor, w: Tensor) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return (p * u * w).sum() - ((p * u).sum(-1) * (p * w).sum(-1)).sum()


class Bernoulli(Likelihood):
    def sample(self, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(rows), generator=generator)

    def nll(self, rows: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(rows, targets.to(rows.dtype), reduction="none").sum(-1).mean()

    def hessian_form(self, z: Tensor, u: Tensor, w: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return (p * (1 - p) * u * w).sum()


class Gaussian(Likelihood):
    def sample(self, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        return rows + torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)

    def nll(self, rows: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (rows - targets.to(rows.dtype)).pow(2).sum(-1).mean()

    def hessian_form(self, z: Tensor, u: Tensor, w: Tensor) -> Tensor:
        return (u * w).sum()


LIKELIHOODS: dict[str, Likelihood] = {"cross_entropy": CrossEntropy(), "bernoulli": Bernoulli(),
                                      "gaussian": Gaussian(), "mse": Gaussian()}


def likelihood(loss_type: str) -> Likelihood:
    """The likelihood of ``loss_type`` (``ValueError`` naming the known ones otherwise)."""
    if loss_type not in LIKELIHOODS:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return LIKELIHOODS[loss_type]


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
