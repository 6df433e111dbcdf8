"""Layer types of the ecosystem through the registry's probe (or one registration line): HF
``Conv1D`` (``y = x @ W + b``, ``W``: ``d_in × d_out``), a module whose forward is ``F.embedding``
on its own weight, and RMSNorm-like modules (``LlamaRMSNorm``, a hand-written one), against dense
float64 solves built without the library (rows by ``retain_grad``, per-sample gradients by
``torch.func``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import one_thread  # noqa: F401  (autouse fixture)
from layer_reference import (
    EXACT_KINDS,
    KRON_KINDS,
    exact_direction,
    kron_direction,
    library_directions,
    output_grads,
    per_sample_params,
)
from torch import nn

import cgfac

pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D


class FunctionalEmbedding(nn.Module):
    """A user module: ``F.embedding`` on its own weight."""

    def __init__(self, v: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(v, d))

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class HandRMSNorm(nn.Module):
    """An RMSNorm as model code writes it, with ε under another name and a shift."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.epsilon = 1e-5

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) + self.bias


class GemmaNorm(nn.Module):
    """GemmaRMSNorm's forward: the scale is ``1 + weight`` (computed in float32)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c))
        self.eps = 1e-6

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class NotANorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.weight * x


def rule(pre, name):
    return {e.name: e for e in pre.registration_report()}[name].rule


@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_hf_conv1d_matches_dense_solve(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), nn.Linear(5, 3)).double()  # Conv1D(nf=5, nx=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)  # (batch, seq, d_in): 6 samples
    y = torch.randint(0, 3, (3, 2), generator=gen)

    def loss(out, t, reduction="mean"):
        return F.cross_entropy(out.reshape(-1, 3), t.reshape(-1), reduction=reduction)

    conv = model[0]
    inputs, gouts = output_grads(model, {"c": conv}, lambda: loss(model(x), y, "sum"))
    loss(model(x), y).backward()
    grad_m = torch.cat([conv.weight.grad.T, conv.bias.grad[:, None]], 1).clone()  # [Wᵀ, b]: 5 × 5
    model.zero_grad()
    if "exact" in kind:
        ps = per_sample_params(model, loss, x.reshape(6, 4), y.reshape(6))
        jac = torch.cat([ps["0.weight"].transpose(1, 2), ps["0.bias"][..., None]], 2)
        want = exact_direction(jac, grad_m)
    else:
        a = torch.cat([inputs["c"].reshape(6, 4), torch.ones(6, 1, dtype=torch.float64)], 1)
        want = kron_direction(a, gouts["c"].reshape(6, 5), 6, grad_m)
    pre, got = library_directions(kind, model, lambda: loss(model(x), y))
    torch.testing.assert_close(torch.cat([got["0.weight"].T, got["0.bias"][:, None]], 1), want,
                               rtol=1e-8, atol=1e-10)
    assert rule(pre, "0").startswith("probe:conv1d") and "fallback" not in pre.layer_stats()["0"]


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-auto", EXACT_KINDS[0]])
def test_functional_embedding_matches_dense_solve(kind: str) -> None:
    torch.manual_seed(0)
    v, d = 6, 3
    model = nn.Sequential(FunctionalEmbedding(v, d), nn.Tanh(), nn.Linear(d, 4)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, v, (3, 4), generator=gen), torch.randint(0, 4, (3, 4), generator=gen)

    def loss(out, t, reduction="mean"):
        return F.cross_entropy(out.reshape(-1, 4), t.reshape(-1), reduction=reduction)

    _, gouts = output_grads(model, {"e": model[0]}, lambda: loss(model(x), y, "sum"))
    loss(model(x), y).backward()
    grad_w = model[0].weight.grad.T.clone()
    model.zero_grad()
    if "exact" in kind:
        jac = per_sample_params(model, loss, x.reshape(-1), y.reshape(-1))["0.weight"].transpose(1, 2)
        want = exact_direction(jac, grad_w)
    else:
        want = kron_direction(F.one_hot(x.reshape(-1), v).double(), gouts["e"].reshape(-1, d), 12, grad_w)
    pre, got = library_directions(kind, model, lambda: loss(model(x), y))
    torch.testing.assert_close(got["0.weight"].T, want, rtol=1e-8, atol=1e-10)
    assert rule(pre, "0").startswith("probe:embedding")


@pytest.mark.parametrize("norm", ["llama", "hand", "llama-registered", "gemma"])
@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-cg", EXACT_KINDS[1]])
def test_rms_norm_like_matches_dense_solve(kind: str, norm: str, clean_registry) -> None:
    torch.manual_seed(0)
    c = 5
    layer = HandRMSNorm(c) if norm == "hand" else GemmaNorm(c) if norm == "gemma" else LlamaRMSNorm(c, eps=1e-6)
    if norm == "llama-registered":
        cgfac.register_layer_helper(LlamaRMSNorm, cgfac.layers.rms_norm_helper)  # the one-line alternative
    model = nn.Sequential(nn.Linear(4, c), layer, nn.Tanh(), nn.Linear(c, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.5) if norm == "gemma" else model[1].weight.uniform_(0.5, 1.5)
        if norm == "hand":
            model[1].bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    ps = per_sample_params(model, F.cross_entropy, x, y)
    has_bias = norm == "hand"
    jac = torch.stack([ps["1.weight"]] + ([ps["1.bias"]] if has_bias else []), -1)  # (n, C, k)
    F.cross_entropy(model(x), y).backward()
    grad_m = torch.stack([model[1].weight.grad] + ([model[1].bias.grad] if has_bias else []), -1).clone()
    model.zero_grad()
    pre, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    want = torch.cat([exact_direction(jac[:, i: i + 1], grad_m[i: i + 1]) for i in range(c)])
    got_m = torch.stack([got["1.weight"]] + ([got["1.bias"]] if has_bias else []), -1)
    torch.testing.assert_close(got_m, want, rtol=1e-7, atol=1e-10)
    expected = "registered:LlamaRMSNorm" if norm == "llama-registered" else "probe:rms-norm"
    assert rule(pre, "1").startswith(expected)
    assert pre.layer_stats()["1"]["method"] in ("feature-blocks", "eigen")


def test_probe_rejects_other_forwards_and_leaves_random_state_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), NotANorm(4), nn.Linear(4, 2))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    pre = cgfac.CGFAC(model)
    assert torch.equal(torch.get_rng_state(), before)
    entry = {e.name: e for e in pre.registration_report()}["1"]
    assert not entry.covered and "NotANorm is not a covered layer type (probe" in entry.reason
    assert "rms-norm" in entry.reason  # the candidates it was compared with


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_are_fully_covered(arch: str) -> None:
    from hf_models import tiny_model

    model = tiny_model(arch)
    pre = cgfac.KFAC(model)
    covered = {id(p) for h in pre.layers.values() for p in h.params()}
    params = list(model.parameters())
    assert all(id(p) in covered for p in params), [e for e in pre.registration_report() if not e.covered]
    rules = {e.rule for e in pre.registration_report()}
    if arch == "gpt2":  # Conv1D projections by the probe, wte and lm_head one tied block
        assert "probe:conv1d (forward is x @ weight + bias, HF Conv1D layout)" in rules
        assert "transformer.wte+lm_head" in pre.layers
    else:
        assert any(r.startswith("probe:rms-norm") for r in rules)
