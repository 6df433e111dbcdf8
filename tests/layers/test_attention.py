"""Attention: ``nn.MultiheadAttention``'s projections (packed, k-is-v, separate ``kdim/vdim``
weights, no bias, ``batch_first`` either way), hand-written attention from ``nn.Linear``, and a
module called twice in one forward; against dense solves (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from layer_reference import (
    EXACT_KINDS,
    KRON_KINDS,
    PRECONDITIONERS,
    exact_direction,
    kron_direction,
    library_directions,
    per_sample_params,
)
from torch import nn

E, H, C, N, L = 4, 2, 3, 3, 3
KD, VD = 3, 5


class Attn(nn.Module):
    """Inputs ``(N, L, width)``: query, key and value are slices of the last dim."""

    def __init__(self, mode: str, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.mode = mode
        kw = {"kdim": KD, "vdim": VD} if mode == "separate" else {}
        self.mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, **kw)
        self.head = nn.Linear(E, C)

    @property
    def width(self) -> int:
        return {"self": E, "kv": 2 * E, "separate": E + KD + VD}[self.mode]

    def qkv(self, x):
        if self.mode == "self":
            return x, x, x
        if self.mode == "kv":
            return x[..., :E], x[..., E:], x[..., E:]
        return x[..., :E], x[..., E: E + KD], x[..., E + KD:]

    def forward(self, x):
        q, k, v = self.qkv(x)
        if not self.mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            if self.mode == "self":
                k = v = q
            elif self.mode == "kv":
                v = k
        out = self.mha(q, k, v)[0]
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        return self.head(out)


def ref_projections(m: nn.MultiheadAttention, q_in, k_in, v_in):
    """MHA written out with ``F.linear`` (batch first): output and, per projection, (input, output)."""
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq, bk, bv = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(q_in, wq, bq), F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)
    for t in (q, k, v):
        t.retain_grad()
    d = E // H

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], H, d).transpose(1, 2)

    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d), -1)
    o = (att @ heads(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], E)
    out = F.linear(o, m.out_proj.weight, m.out_proj.bias)
    out.retain_grad()
    return out, {"q_proj": (q_in, q), "k_proj": (k_in, k), "v_proj": (v_in, v), "out_proj": (o, out)}


def proj_matrix(mha: nn.MultiheadAttention, tensors: dict, part: str, lead: int = 0) -> torch.Tensor:
    """A projection's layer matrix (bias last column) from ``tensors`` named like the parameters."""
    i = ("q_proj", "k_proj", "v_proj").index(part) if part != "out_proj" else None
    if part == "out_proj":
        w, b = tensors["out_proj.weight"], tensors.get("out_proj.bias")
    else:
        w = tensors["in_proj_weight"].narrow(lead, i * E, E) if mha._qkv_same_embed_dim else tensors[f"{part}_weight"]
        b = tensors.get("in_proj_bias")
        b = None if b is None else b.narrow(lead, i * E, E)
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], -1)


CASES = {
    "self": ("self", True, True),
    "self-seqfirst": ("self", True, False),
    "kv-nobias": ("kv", False, True),
    "separate-kdim-vdim": ("separate", True, True),
}


def loss(out, y, reduction="mean"):
    return F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_mha_direction_matches_dense_solve(case: str, kind: str) -> None:
    mode, bias, batch_first = CASES[case]
    torch.manual_seed(0)
    model = Attn(mode, bias, batch_first).double()
    mha = model.mha
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, L, model.width, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N, L), generator=gen)
    # reference rows: samples are sequences, T = L rows each; g of the loss summed over sequences
    out, proj = ref_projections(mha, *model.qkv(x))
    torch.testing.assert_close(model.head(out), model(x))
    loss(model.head(out), y).mul(N).backward()
    params = {k: v.grad.clone() for k, v in mha.named_parameters()}
    mean = {k: v / N for k, v in params.items()}
    model.zero_grad()
    if "exact" in kind:
        jac = {k[4:]: v for k, v in per_sample_params(model, loss, x, y).items() if k.startswith("mha.")}
    pre, got = library_directions(kind, model, lambda: loss(model(x), y))
    got = {k[4:]: v for k, v in got.items() if k.startswith("mha.")}
    report = {e.name: e for e in pre.registration_report()}
    assert report["mha"].covered and report["mha.out_proj"].covered
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        grad_w = proj_matrix(mha, mean, part)
        if "exact" in kind:
            want = exact_direction(proj_matrix(mha, jac, part, lead=1), grad_w)
        else:
            a_in, t_out = proj[part]
            a = a_in.detach().reshape(N * L, -1)
            if bias:
                a = torch.cat([a, torch.ones(N * L, 1, dtype=a.dtype)], 1)
            want = kron_direction(a, t_out.grad.reshape(N * L, -1), N, grad_w)
        torch.testing.assert_close(proj_matrix(mha, got, part), want, rtol=1e-8, atol=1e-10)
    for name, st in pre.layer_stats().items():
        assert "fallback" not in st, (name, st)
    assert {"mha:q_proj", "mha:k_proj", "mha:v_proj", "mha.out_proj"} <= set(pre.layer_stats())


class HandWritten(nn.Module):
    """Single-head attention from ``nn.Linear``; ``tied`` is called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.tied = nn.Linear(E, E)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(E), -1)
        h = torch.tanh(self.o(att @ self.v(x)))
        return self.head(self.tied(torch.tanh(self.tied(h))))


@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_hand_written_attention_and_module_called_twice(kind: str) -> None:
    """``nn.Linear`` rows: every position a sample; the twice-called module's two uses by one
    position are that sample's two rows (``T = 2``): ``A = aᵀa/(2r)``, ``J_s = Σ_uses g aᵀ``."""
    torch.manual_seed(0)
    model = HandWritten().double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N, L), generator=gen)
    r = N * L
    rows: dict[str, list] = {}
    handles = []
    for name in ("q", "k", "v", "o", "tied"):
        def hook(mod, inp, out, name=name):
            out.retain_grad()
            rows.setdefault(name, []).append((inp[0].detach(), out))
        handles.append(getattr(model, name).register_forward_hook(hook))
    loss(model(x), y).mul(r).backward()  # summed over positions: per-position output gradients
    for h in handles:
        h.remove()
    model.zero_grad()
    loss(model(x), y).backward()
    mean = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()
            for n, m in model.named_children() if n != "head"}
    model.zero_grad()
    _, got = library_directions(kind, model, lambda: loss(model(x), y))
    for name, uses in rows.items():
        a = torch.stack([torch.cat([i.reshape(r, -1), torch.ones(r, 1, dtype=i.dtype)], 1) for i, _ in uses], 1)
        g = torch.stack([o.grad.reshape(r, -1) for _, o in uses], 1)  # (r, uses, d)
        if "exact" in kind:
            want = exact_direction(torch.einsum("sto,sti->soi", g, a), mean[name])
        else:
            want = kron_direction(a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), r, mean[name])
        m = getattr(model, name)
        got_m = torch.cat([got[f"{name}.weight"], got[f"{name}.bias"][:, None]], 1)
        torch.testing.assert_close(got_m, want, rtol=1e-8, atol=1e-10, msg=f"{name}")
        assert m is getattr(model, name)
    assert len(rows["tied"]) == 2


def test_tied_module_exact_matches_per_sample_gradients() -> None:
    """A position-wise model calling one module twice: the library's exact block is the Fisher of
    the true per-sample gradients (``vmap``), both uses summed."""
    torch.manual_seed(0)
    tied = nn.Linear(E, E).double()
    model = nn.Sequential(tied, nn.Tanh(), tied, nn.Tanh(), nn.Linear(E, C)).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, E, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (7,), generator=gen)
    ps = per_sample_params(model, F.cross_entropy, x, y)
    jac = torch.cat([ps["0.weight"], ps["0.bias"][..., None]], -1)
    F.cross_entropy(model(x), y).backward()
    grad_w = torch.cat([tied.weight.grad, tied.bias.grad[:, None]], 1).clone()
    model.zero_grad()
    _, got = library_directions("cgfac-exact-lowrank", model, lambda: F.cross_entropy(model(x), y))
    want = exact_direction(jac, grad_w)
    torch.testing.assert_close(torch.cat([got["0.weight"], got["0.bias"][:, None]], 1), want, rtol=1e-8, atol=1e-10)


class TinyLM(nn.Module):
    """Token and position embeddings, a pre-norm causal ``nn.TransformerEncoder``, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, 8), nn.Embedding(6, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln, self.out = nn.LayerNorm(8), nn.Linear(8, 11)

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.out(self.ln(self.blocks(h, mask=mask, is_causal=True)))


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-auto", "cgfac-exact-lowrank"])
def test_transformer_lm_is_fully_covered(kind: str) -> None:
    """Every parameter of a small transformer LM is preconditioned (``need_weights=False`` takes
    the fused attention path), steps run without fallback, and a checkpoint round-trips."""
    torch.manual_seed(0)
    model = TinyLM()
    pre = PRECONDITIONERS[kind](model)
    assert all(e.covered for e in pre.registration_report())
    covered = {id(p) for u in pre.layers.values() for p in u.params()}
    assert all(id(p) in covered for p in model.parameters())
    x = torch.randint(0, 11, (3, 6))
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[:, :-1]).reshape(-1, 11), x[:, 1:].reshape(-1)).backward()
        pre.step()
        assert not [n for n, st in pre.layer_stats().items() if "fallback" in st]
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    PRECONDITIONERS[kind](TinyLM()).load_state_dict(pre.state_dict())
