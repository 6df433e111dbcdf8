"""Tied weights: one block for a Parameter used by an embedding and a linear head (and by two
linear layers), against dense float64 references built without the library: per-sample
gradients of the shared weight from ``torch.func`` (exact curvature), and the documented
Kronecker approximation (balanced per-use factors summed, ``torch.kron``) from explicit one-hot
rows and ``retain_grad`` output gradients."""

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

V, D = 7, 3


def tied_model(head_bias: bool) -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=head_bias)
    head.weight = emb.weight  # tied input and output embeddings: one Parameter, two modules
    return nn.Sequential(emb, nn.Tanh(), head).double()


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (3, 4), generator=gen), torch.randint(0, V, (3, 4), generator=gen)


def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction=reduction)


def balanced(a: torch.Tensor, g: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One use's rows scaled so that its two factors have the same mean eigenvalue."""
    mean_a = (a * a).sum() / (a.shape[0] * a.shape[1])
    mean_g = (g * g).sum() / (n * g.shape[1])
    c = (mean_g / mean_a) ** 0.5
    return a * c**0.5, g / c**0.5


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_tied_embedding_and_head_match_dense_solve(kind: str, head_bias: bool) -> None:
    model = tied_model(head_bias)
    emb, head = model[0], model[2]
    x, y = data()
    tokens, n = x.reshape(-1), x.numel()  # every position is a sample of both uses
    inputs, gouts = output_grads(model, {"emb": emb, "head": head}, lambda: loss(model(x), y, "sum"))
    loss(model(x), y).backward()
    # The block is the head's orientation [W, b] (V × (D + 1)); ∇ is the sum of both uses.
    parts = [emb.weight.grad] + ([head.bias.grad[:, None]] if head_bias else [])
    grad_m = torch.cat(parts, 1).clone()
    model.zero_grad()
    if "exact" in kind:
        ps = per_sample_params(model, loss, tokens, y.reshape(-1))
        jac = torch.cat([ps["0.weight"]] + ([ps["2.bias"][..., None]] if head_bias else []), 2)
        torch.testing.assert_close(jac.mean(0), grad_m)  # the per-sample gradients average to ∇
        want = exact_direction(jac, grad_m)
    else:
        ones = torch.ones(n, 1, dtype=torch.float64)
        # head use: inputs (+ ones) and output gradients; embedding use, transposed: its output
        # gradients are the block's input rows (zero in the bias column), its one-hot rows the g rows.
        a_head = torch.cat([inputs["head"].reshape(n, D)] + ([ones] if head_bias else []), 1)
        g_head = gouts["head"].reshape(n, V)
        a_emb = torch.cat([gouts["emb"].reshape(n, D)] + ([0 * ones] if head_bias else []), 1)
        g_emb = F.one_hot(tokens, V).double()
        a_h, g_h = balanced(a_head, g_head, n)
        a_e, g_e = balanced(a_emb, g_emb, n)
        # joined per sample (T = 2 uses): A = Σ aᵀa / (2n), G = Σ gᵀg / n
        want = kron_direction(torch.cat([a_h, a_e]), torch.cat([g_h, g_e]), n, grad_m)
    pre, got = library_directions(kind, model, lambda: loss(model(x), y))
    got_m = torch.cat([got["0.weight"]] + ([got["2.bias"][:, None]] if head_bias else []), 1)
    torch.testing.assert_close(got_m, want, rtol=1e-8, atol=1e-10)
    assert set(pre.layers) == {"0+2"} and "fallback" not in pre.layer_stats()["0+2"]
    report = {e.name: e for e in pre.registration_report()}
    assert report["0"].covered and report["2"].covered
    assert "shares its weight with '2'" in report["0"].reason and report["2"].rule.startswith("tied")


def test_tied_block_differs_from_either_use_alone() -> None:
    """The joined block is not one use's K-FAC block: the reference above can fail."""
    model = tied_model(False)
    x, y = data()
    _, got = library_directions("kfac", model, lambda: loss(model(x), y))
    inputs, gouts = output_grads(model, {"head": model[2]}, lambda: loss(model(x), y, "sum"))
    loss(model(x), y).backward()
    grad_m = model[0].weight.grad.clone()
    n = x.numel()
    head_only = kron_direction(inputs["head"].reshape(n, D), gouts["head"].reshape(n, V), n, grad_m)
    assert not torch.allclose(got["0.weight"], head_only, rtol=1e-3)


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-cg", EXACT_KINDS[0]])
def test_weight_shared_by_two_linear_layers(kind: str) -> None:
    """A square weight used by two Linear layers with their own biases: one block
    ``[W, b_1, b_2]``, each use's rows with a one in its own bias column."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    n = x.shape[0]
    inputs, gouts = output_grads(model, {"a": model[0], "b": model[2]}, lambda: F.cross_entropy(model(x), y,
                                                                                               reduction="sum"))
    F.cross_entropy(model(x), y).backward()
    grad_m = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None], model[2].bias.grad[:, None]], 1).clone()
    model.zero_grad()
    if "exact" in kind:
        ps = per_sample_params(model, F.cross_entropy, x, y)
        jac = torch.cat([ps["0.weight"], ps["0.bias"][..., None], ps["2.bias"][..., None]], 2)
        want = exact_direction(jac, grad_m)
    else:
        one, zero = torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
        a1, g1 = balanced(torch.cat([inputs["a"], one, zero], 1), gouts["a"], n)
        a2, g2 = balanced(torch.cat([inputs["b"], zero, one], 1), gouts["b"], n)
        want = kron_direction(torch.cat([a1, a2]), torch.cat([g1, g2]), n, grad_m)
    pre, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    got_m = torch.cat([got["0.weight"], got["0.bias"][:, None], got["2.bias"][:, None]], 1)
    torch.testing.assert_close(got_m, want, rtol=1e-8, atol=1e-10)
    assert set(pre.layers) == {"0+2", "4"}


def test_untieable_sharing_is_reported() -> None:
    """A bias shared by two layers whose weights differ cannot be one block: plain gradient, with
    the reason; an unrelated sparse embedding keeps its own reason."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.bias = first.bias
    model = nn.Sequential(first, nn.Tanh(), second, nn.Embedding(V, D, sparse=True), nn.Linear(3, 2))
    pre = cgfac.KFAC(model)
    report = {e.name: e for e in pre.registration_report()}
    assert not report["0"].covered and "shares a Parameter with '2'" in report["0"].reason
    assert "bias alone" in report["2"].reason
    assert not report["3"].covered and "sparse" in report["3"].reason
    assert set(pre.layers) == {"4"}


def test_tied_block_checkpoint_and_true_fisher() -> None:
    """The tied block's state round-trips, and the true Fisher captures both uses' rows."""
    model = tied_model(True)
    x, _ = data()
    pre = cgfac.KFAC(model, fisher="true", kl_clip=None)
    out = model(x)
    pre.sample_fisher(out, "cross_entropy")
    loss(out, x).backward()
    pre.step()
    assert "fallback" not in pre.layer_stats()["0+2"]
    state = pre.state_dict()
    assert tuple(state["layers"]["0+2"]["shape"]) == (V, D + 1)
    other = cgfac.KFAC(tied_model(True), fisher="true", kl_clip=None)
    other.load_state_dict(state)
    torch.testing.assert_close(other.factors["0+2"][0], pre.factors["0+2"][0])


def test_sharing_with_a_skipped_module_keeps_the_plain_gradient() -> None:
    """The shared .grad holds the skipped module's share: the other use is not preconditioned."""
    tied = tied_model(False)
    model = nn.Sequential(*tied, nn.Tanh(), nn.Linear(V, V).double())
    pre = cgfac.CGFAC(model, skip_layers=["2"], kl_clip=None)
    report = {e.name: e for e in pre.registration_report()}
    assert report["2"].reason == "in skip_layers" and set(pre.layers) == {"4"}
    assert not report["0"].covered and "which is in skip_layers" in report["0"].reason
    x, y = data()
    loss(model(x), y).backward()
    plain = model[0].weight.grad.clone()
    pre.step()
    assert torch.equal(model[0].weight.grad, plain)
