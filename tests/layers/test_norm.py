"""Normalisation layers: the exact per-feature 2×2 (scale, shift) blocks, damped, against dense
solves from per-sample gradients (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_reference import (
    EXACT_KINDS,
    KRON_KINDS,
    exact_direction,
    library_directions,
    output_grads,
    per_sample_params,
)
from torch import nn

CASES = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "layernorm-nobias": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5, bias=False), nn.Tanh(),
                                               nn.Linear(5, 3)), (4,)),
    "rmsnorm": (lambda: nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(16, 3)), (2, 4, 4)),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                                          nn.Linear(12, 3)), (2, 4, 4)),
}


def setup(case: str):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make().double()
    with torch.no_grad():  # non-trivial scale and shift
        model[1].weight.uniform_(0.5, 1.5)
        if getattr(model[1], "bias", None) is not None:
            model[1].bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    return model, x, y


def norm_jacobians(case: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of (scale, shift), ``(n, C, k)``."""
    norm = model[1]
    if "batchnorm" not in case:
        ps = per_sample_params(model, F.cross_entropy, x, y)
        parts = [ps["1.weight"]] + ([ps["1.bias"]] if getattr(norm, "bias", None) is not None else [])
        return torch.stack([p.reshape(x.shape[0], -1) for p in parts], -1)
    # batch statistics couple the samples: sample s's share of the gradient, from x̂ and dL/dy
    inputs, gouts = output_grads(model, {"bn": norm}, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    xhat = F.batch_norm(inputs["bn"], None, None, training=True, eps=norm.eps)
    g = gouts["bn"]
    dims = list(range(2, g.dim()))
    gx, gs = (g * xhat), g
    if dims:
        gx, gs = gx.sum(dims), gs.sum(dims)
    return torch.stack([gx, gs], -1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-cg", "cgfac-kron-auto", EXACT_KINDS[0], EXACT_KINDS[1]])
def test_norm_direction_matches_dense_solve(case: str, kind: str) -> None:
    assert kind in KRON_KINDS + EXACT_KINDS
    model, x, y = setup(case)
    norm = model[1]
    jac = norm_jacobians(case, model, x, y)
    F.cross_entropy(model(x), y).backward()
    has_bias = getattr(norm, "bias", None) is not None
    grads = [norm.weight.grad.reshape(-1)] + ([norm.bias.grad] if has_bias else [])
    grad_m = torch.stack(grads, -1).clone()
    torch.testing.assert_close(jac.mean(0), grad_m)  # the per-sample gradients average to ∇
    model.zero_grad()
    pre, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    want = torch.cat([exact_direction(jac[:, c: c + 1], grad_m[c: c + 1]) for c in range(grad_m.shape[0])])
    got_m = torch.stack([got["1.weight"].reshape(-1)] + ([got["1.bias"]] if has_bias else []), -1)
    torch.testing.assert_close(got_m, want, rtol=1e-8, atol=1e-10)
    st = pre.layer_stats()["1"]
    assert "fallback" not in st and st["method"] in ("feature-blocks", "eigen")
