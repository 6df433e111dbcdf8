"""The benchmark models: shapes, causality, and every parameter registered by CG-FAC and K-FAC;
the wide tasks' widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgfac
from cgfac_bench.models import INPUT_SHAPES, MODELS, build_model, transformer_lm, wide_widths


def _inputs(task: str, batch: int) -> torch.Tensor:
    if task == "transformer":
        return torch.randint(0, 256, (batch, *INPUT_SHAPES[task]), generator=torch.Generator().manual_seed(0))
    return torch.rand(batch, *INPUT_SHAPES[task], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("task", "out_shape"), [("transformer", (3, 128, 256)), ("cnn-norm", (3, 10))])
def test_new_models_build_and_forward(task: str, out_shape: tuple[int, ...]) -> None:
    assert task in MODELS and task in INPUT_SHAPES
    torch.manual_seed(0)
    model = build_model(task)
    assert model(_inputs(task, 3)).shape == out_shape


@pytest.mark.parametrize("train", [True, False])  # eval + no_grad takes MultiheadAttention's fast path
def test_transformer_is_causal(train: bool) -> None:
    torch.manual_seed(0)
    model = transformer_lm(context=12, width=16, heads=2).train(train)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("task", ["transformer", "cnn-norm"])
@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_new_models_fully_covered(task: str, cls: type) -> None:
    torch.manual_seed(0)
    model = build_model(task)
    pre = cls(model)
    assert all(e.covered for e in pre.registration_report())
    covered = {id(p) for u in pre.layers.values() for p in u.params()}
    assert all(id(p) in covered for p in model.parameters())


@pytest.mark.parametrize("task", ["transformer-small", "cnn-norm"])
@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_new_models_step_without_fallback(task: str, cls: type) -> None:
    torch.manual_seed(0)
    if task == "cnn-norm":
        model = build_model(task)
        loss = lambda: F.cross_entropy(model(_inputs(task, 4)), torch.tensor([0, 1, 2, 3]))  # noqa: E731
    else:
        model = transformer_lm(context=12, width=16, heads=2)
        x = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(1))
        loss = lambda: F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))  # noqa: E731
    pre = cls(model)
    for _ in range(2):
        model.zero_grad()
        loss().backward()
        pre.step()
        assert not [n for n, st in pre.layer_stats().items() if "fallback" in st]
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nanogpt_moe_routes_tokens_to_experts_and_is_covered() -> None:
    from cgfac_bench.models import NanoGPT, NanoMoE

    torch.manual_seed(0)
    model = NanoGPT(20, context=8, width=16, depth=1, heads=2, experts=4)
    x = torch.randint(0, 20, (3, 8))
    out = model(x)
    assert out.shape == (3, 8, 20)
    moe = next(m for m in model.modules() if isinstance(m, NanoMoE))
    # top 2 of 4 experts of width 32: the active MLP width is the dense block's 4 x 16
    assert moe.experts.c_fc.shape == (4, 32, 16) and moe.experts.mlp_proj.shape == (4, 16, 32)
    assert 0.99 < float(model.aux_loss()) < 4.0  # E·Σ f_e P_e: 1 when balanced, E when collapsed
    opt = cgfac.optim.TransformerKFAC(model, lr=1e-3)
    assert opt.routes["blocks.0.moe.experts.c_fc"] == "kron-experts"
    assert opt.routes["blocks.0.moe.router.weight"] == "kron"
    pre = cgfac.KFAC(model)
    assert all(e.covered for e in pre.registration_report())
    assert "blocks.0.moe.experts.mlp_proj:3" in pre.layers


def test_wide_models_scale_the_hidden_widths() -> None:
    assert wide_widths(1) == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert wide_widths(4) == (784, 4000, 2000, 1000, 30, 1000, 2000, 4000, 784)
    model = build_model("autoencoder-wide", width_mult=0.5)
    shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
    assert shapes[0] == (500, 784) and shapes[3] == (30, 125) and shapes[-1] == (784, 500)
    assert model(torch.rand(3, 784)).shape == (3, 784)
    mlp = build_model("mlp-wide", width=32)
    assert [tuple(m.weight.shape) for m in mlp if isinstance(m, nn.Linear)] == [(32, 784), (32, 32), (32, 32), (10, 32)]
    with pytest.raises(ValueError, match="width_mult"):
        wide_widths(0)
    with pytest.raises(ValueError, match="do not apply"):
        build_model("mlp", width=3)
