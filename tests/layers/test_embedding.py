"""``nn.Embedding``: the diagonal input factor (token counts) and the exact block, against dense
solves with explicit one-hot rows and per-token gradients (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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

V, D, C = 6, 3, 4
CASES = {
    "plain": {},
    "padding_idx": {"padding_idx": 0},
    "max_norm": {"max_norm": 1.0},
}


def setup(case: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D, **CASES[case]), nn.Tanh(), nn.Linear(D, C)).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (3, 4), generator=gen)
    x[0, :2] = 0  # index 0 (the padding index in that case) appears
    y = torch.randint(0, C, (3, 4), generator=gen)
    return model, x, y


def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_embedding_direction_matches_dense_solve(case: str, kind: str) -> None:
    model, x, y = setup(case)
    emb = model[0]
    tokens = x.reshape(-1)
    r = tokens.numel()  # every token is a sample
    _, gouts = output_grads(model, {"emb": emb}, lambda: loss(model(x), y, "sum"))
    loss(model(x), y).backward()
    grad_w = emb.weight.grad.T.clone()  # layer matrix W = weightᵀ (D × V)
    model.zero_grad()
    if "exact" in kind:
        if case == "max_norm":
            pytest.skip("vmap cannot run the in-place max_norm renormalisation")
        jac = per_sample_params(model, loss, tokens, y.reshape(-1))["0.weight"].transpose(1, 2)
    pre, got = library_directions(kind, model, lambda: loss(model(x), y))
    if "exact" in kind:
        want = exact_direction(jac, grad_w)
    else:
        a = F.one_hot(tokens, V).double()
        g = gouts["emb"].reshape(-1, D).clone()
        if emb.padding_idx is not None:
            g[tokens == emb.padding_idx] = 0  # a padding position's gradient is zero
        want = kron_direction(a, g, r, grad_w)
    torch.testing.assert_close(got["0.weight"].T, want, rtol=1e-8, atol=1e-10)
    if emb.padding_idx is not None:
        assert torch.all(got["0.weight"][emb.padding_idx] == 0)
    assert "fallback" not in pre.layer_stats()["0"]
    if "exact" not in kind:
        assert pre.layer_stats()["0"].get("method") in ("diag-kron", "eigen")


def test_sparse_embedding_is_reported_and_tied_embedding_is_one_block() -> None:
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight  # tied input and output embeddings: one Parameter, two modules
    model = nn.Sequential(emb, nn.Tanh(), head, nn.Embedding(V, D, sparse=True), nn.Linear(D, 2))
    pre = cgfac.KFAC(model)
    report = {e.name: e for e in pre.registration_report()}
    assert report["0"].covered and "shares its weight with '2'" in report["0"].reason
    assert report["2"].covered and "shares its weight with '0'" in report["2"].reason
    assert not report["3"].covered and "sparse" in report["3"].reason
    assert report["4"].covered and set(pre.layers) == {"0+2", "4"}


def test_tied_embedding_replaces_the_shared_gradient() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D).double()
    head = nn.Linear(D, V).double()
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head, nn.Tanh(), nn.Linear(V, V).double())
    x = torch.randint(0, V, (2, 3))
    pre = cgfac.CGFAC(model, kl_clip=None)
    assert set(pre.layers) == {"0+2", "4"}
    F.cross_entropy(model(x).reshape(-1, V), x.reshape(-1)).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    for n, p in model.named_parameters():  # every parameter, the shared one included, has its direction
        assert not torch.equal(p.grad, plain[n]), n
