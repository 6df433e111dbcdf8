"""cgfac.losses: each likelihood's output-Hessian form against torch.func's Hessian of its own
negative log-likelihood (float64), its samples' distribution, and the loss-type lookup."""

from __future__ import annotations

import pytest
import torch

from cgfac.losses import LIKELIHOODS, LOSS_TYPES, likelihood


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_hessian_form_is_the_hessian_of_the_nll(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, classes = 5, 4
    z = torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    u, w = torch.randn(2, rows, classes, generator=gen, dtype=torch.float64)
    model = likelihood(loss_type)
    targets = model.sample(z, gen)
    # the nll is a mean over rows: its Hessian is H/rows, so Σ_rows uᵀHw = rows · uᵀ ∇²nll w
    hess = torch.func.hessian(lambda x: model.nll(x, targets))(z).reshape(rows * classes, rows * classes)
    expected = rows * (u.reshape(-1) @ hess @ w.reshape(-1))
    torch.testing.assert_close(model.hessian_form(z, u, w), expected, rtol=1e-10, atol=1e-12)


def test_samples_follow_the_model_distribution() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64).expand(20000, 3)
    counts = torch.bincount(likelihood("cross_entropy").sample(z, gen), minlength=3).double() / z.shape[0]
    torch.testing.assert_close(counts, torch.softmax(z[0], -1), atol=0.015, rtol=0)
    mean = likelihood("bernoulli").sample(z, gen).mean(0)
    torch.testing.assert_close(mean, torch.sigmoid(z[0]), atol=0.015, rtol=0)
    noise = likelihood("gaussian").sample(z, gen) - z
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02


def test_lookup() -> None:
    assert type(likelihood("mse")) is type(LIKELIHOODS["gaussian"])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        likelihood("poisson")
