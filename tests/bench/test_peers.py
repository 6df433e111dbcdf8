"""The benchmarks' peer optimizers (:mod:`cgfac_bench.peers`): Muon on the hidden matrices, AdamW on the rest."""

from __future__ import annotations

import torch
from torch import nn

from cgfac_bench import peers
from cgfac_bench.models import build_model


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    torch.manual_seed(0)
    model = build_model("mlp-wide", width=16)
    hidden, rest = peers.hidden_matrices(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [id(p) for p in hidden] == [id(m.weight) for m in linears[:-1]]
    assert {id(p) for p in rest} == {id(linears[-1].weight)} | {id(m.bias) for m in linears}
    opt = peers.muon_with_adamw(model, 1e-3)
    assert isinstance(opt.optimizers[0], torch.optim.Muon) and isinstance(opt.optimizers[1], torch.optim.AdamW)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.load_state_dict(opt.state_dict())
