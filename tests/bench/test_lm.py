"""The language-model benchmark's optimizer factory: every optimizer builds over a tiny nanoGPT and
takes finite steps that lower the training loss on a fixed batch."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from cgfac_bench.lm import LM_OPTIMIZERS, TKFAC_VARIANTS, make_lm_optimizer
from cgfac_bench.models import NanoGPT

OPTIONAL = {"soap": "pytorch_optimizer", "kron": "kron_torch"}


@pytest.mark.parametrize("name", LM_OPTIMIZERS)
def test_every_lm_optimizer_steps(name: str) -> None:
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
        pytest.skip(f"{OPTIONAL[name]} is not installed")
    torch.manual_seed(0)
    model = NanoGPT(vocab=11, context=8, width=16, depth=1, heads=2)
    hyper = {"rows": 8, "factor_every": 2, "eig_every": 2} if name in TKFAC_VARIANTS and "ekfac" not in name else {}
    opt = make_lm_optimizer(name, model, lr=3e-3, wd=0.1, hyper=hyper)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (4, 8), generator=g)
    y = torch.randint(0, 11, (4, 8), generator=g)
    losses = []
    # kron-torch wraps its updates in torch.compile (14 s of compilation here): eager is the same maths
    with torch._dynamo.config.patch(disable=name == "kron"):
        for _ in range(6):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            losses.append(float(loss))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
