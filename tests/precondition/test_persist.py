"""Checkpoints (:mod:`cgfac.precondition.persist`): exact resume, states from another model or
class refused."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgfac


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 8),
                         nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen)


RESUMABLE = {
    "cgfac-cg-window": lambda m: cgfac.CGFAC(m, solver="cg", curvature_window=3, cg_tol=1e-4),
    "cgfac-auto": lambda m: cgfac.CGFAC(m, damping=lambda s: 1e-2 / (1 + s)),
    "cgfac-exact": lambda m: cgfac.CGFAC(m, curvature="exact", solver="cg", curvature_samples=6),
    "cgfac-true-fisher": lambda m: cgfac.CGFAC(m, fisher="true", solver="lowrank"),
    "kfac": lambda m: cgfac.KFAC(m, inv_update_steps=3, factor_update_steps=2),
    "kfac-true-fisher": lambda m: cgfac.KFAC(m, fisher="true", inv_update_steps=2),
}


def train_steps(model, opt, pre, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        out = model(x)
        if pre.fisher == "true":
            pre.sample_fisher(out, "cross_entropy")
        F.cross_entropy(out, y).backward()
        pre.step()
        opt.step()


def fresh(kind: str):
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, RESUMABLE[kind](model)


@pytest.mark.parametrize("kind", list(RESUMABLE))
def test_resume_is_bitwise_exact(kind: str) -> None:
    model, opt, pre = fresh(kind)
    train_steps(model, opt, pre, 0, 8)
    want = [p.detach().clone() for p in model.parameters()]

    model, opt, pre = fresh(kind)
    train_steps(model, opt, pre, 0, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pre": pre.state_dict()}, buf)
    del model, opt, pre
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model, opt, pre = fresh(kind)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    pre.load_state_dict(saved["pre"])
    assert pre.steps == 5
    train_steps(model, opt, pre, 5, 8)
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.detach(), w)


def test_state_from_another_model_or_class_is_refused() -> None:
    state = cgfac.CGFAC(net()).state_dict()
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="different model"):
        cgfac.CGFAC(other).load_state_dict(state)
    wider = net()
    wider[3] = nn.Linear(3 * 16, 9)
    wider[4] = nn.LayerNorm(9)
    wider[6] = nn.Linear(9, 4)
    with pytest.raises(ValueError, match=r"3: saved \(8, 49\), model \(9, 49\)"):
        cgfac.CGFAC(wider).load_state_dict(state)
    with pytest.raises(ValueError, match="saved from CGFAC"):
        cgfac.KFAC(net()).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        cgfac.KFAC(net()).load_state_dict({"steps": 3})
