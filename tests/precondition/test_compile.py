"""``torch.compile``: a compiled model's captured rows and directions are the eager ones (float64,
bit-for-bit or to rounding), its blocks are named as the original modules', for a small model
with every capture path (Linear, LayerNorm, Embedding, MultiheadAttention, a tied weight) and a
tiny GPT-2. The ``aot_eager`` backend keeps the test fast; ``inductor`` (the default backend) was
checked the same way by hand (GPT-2: relative difference 2e-12) and is measured in
``benchmarks/compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import one_thread, tiny_model, token_batches  # noqa: F401  (autouse fixture)
from torch import nn

import cgfac


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(self.hidden(self.norm(h))))


def directions(make, compile_backend, run, kind, steps=2):
    model = make()
    target = torch.compile(model, backend=compile_backend) if compile_backend else model
    pre = kind(target, kl_clip=None)
    out = []
    for k in range(steps):
        model.zero_grad()
        run(target, k).backward()
        pre.step()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return pre, out


@pytest.mark.parametrize("kind", [cgfac.KFAC, cgfac.CGFAC])
def test_compiled_small_model_gives_the_eager_directions(kind) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 11, (4, 5), generator=gen) for _ in range(2)]

    def make():
        torch.manual_seed(0)
        return Small().double()

    def run(model, k):
        return F.cross_entropy(model(xs[k]).reshape(-1, 11), xs[k].reshape(-1))

    eager_pre, want = directions(make, None, run, kind)
    pre, got = directions(make, "aot_eager", run, kind)
    assert list(pre.layers) == list(eager_pre.layers)  # named as the original modules (no _orig_mod.)
    assert "emb+head" in pre.layers and "attn:q_proj" in pre.layers
    for w, g in zip(want, got):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-10, atol=1e-13, msg=name)
    assert not any("fallback" in st for st in pre.layer_stats().values())


def test_compiled_gpt2_gives_the_eager_directions() -> None:
    pytest.importorskip("transformers")
    batches = token_batches(2, 2)

    def run(model, k):
        return model(**batches[k]).loss

    eager_pre, want = directions(lambda: tiny_model("gpt2"), None, run, cgfac.KFAC)
    pre, got = directions(lambda: tiny_model("gpt2"), "aot_eager", run, cgfac.KFAC)
    assert list(pre.layers) == list(eager_pre.layers)
    for w, g in zip(want, got):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-10, atol=1e-13, msg=name)
