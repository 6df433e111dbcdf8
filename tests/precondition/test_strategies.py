"""The one-process strategy (:mod:`cgfac.precondition.strategies`): the step's skip decision on
non-finite gradients, and its one device read (counted, not timed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from host_reads import count_reads
from torch import nn

import cgfac
from cgfac.curvature import kron


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 8),
                         nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def one_backward(model: nn.Module, step: int = 0) -> None:
    model.zero_grad()
    x, y = batch(step)
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_non_finite_gradient_skips_the_step(cls) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cls(model)
    one_backward(model)
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        pre.step()
    assert pre.skipped_steps == 1 and pre.steps == 0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert all(not h.chunks for h in pre.layers.values())


def test_non_finite_gradient_is_left_to_an_enabled_grad_scaler() -> None:
    torch.manual_seed(0)
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    pre = cgfac.CGFAC(model, grad_scaler=scaler)
    one_backward(model)
    model[3].weight.grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in model.parameters()]
    pre.step()
    assert pre.skipped_steps == 1
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_large_float16_gradients_are_not_mistaken_for_overflow() -> None:
    model = nn.Linear(300, 300).half()
    pre = cgfac.CGFAC(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 60000.0)  # finite, but their float16 sum would overflow
    assert pre._grads_finite()
    model.weight.grad[0, 0] = float("inf")
    assert not pre._grads_finite()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))


def _backward(model: nn.Module, pre: cgfac.Preconditioner | None = None, bad: bool = False) -> None:
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    out = model(x)
    if pre is not None and pre.fisher == "true":
        pre.sample_fisher(out, "cross_entropy")
    F.cross_entropy(out, y).backward()
    if bad:
        next(model.parameters()).grad[0, 0] = float("nan")


CASES = [
    {},
    {"damping_form": "factored"},
    {"damping_scale": "relative"},
    {"damping_scale": "rank", "damping_form": "factored"},
    {"graft": "rmsprop", "kl_clip": None},
    {"fisher": "true"},
    {"kl_clip": None},
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_lowrank_step_reads_the_device_once(kwargs: dict) -> None:
    model = _model()
    pre = cgfac.CGFAC(model, solver="lowrank", curvature_samples=8, **kwargs)
    for step in range(3):
        model.zero_grad()
        _backward(model, pre)
        with count_reads() as seen:
            pre.step()
        assert len(seen) == 1, (step, seen)
        assert all(isinstance(v, float) for st in pre.layer_stats().values()
                   for k, v in st.items() if k in ("damping", "curvature_bound"))
    assert pre.fallbacks == 0


def test_a_skipped_step_also_reads_once_and_keeps_no_rows() -> None:
    model = _model()
    pre = cgfac.CGFAC(model, solver="lowrank", curvature_window=2)
    model.zero_grad()
    _backward(model, pre)
    pre.step()
    before = {name: len(pre.windows[name]) for name in pre.layers}
    model.zero_grad()
    _backward(model, pre, bad=True)
    with count_reads() as seen, pytest.warns(RuntimeWarning, match="non-finite gradient"):
        pre.step()
    assert len(seen) == 1
    assert {name: len(pre.windows[name]) for name in pre.layers} == before
    assert pre.skipped_steps == 1
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_non_finite_rows_are_dropped_after_the_read_and_the_older_batch_restored() -> None:
    model = _model()
    pre = cgfac.CGFAC(model, solver="lowrank", curvature_window=1)
    model.zero_grad()
    _backward(model, pre)
    pre.step()
    kept = pre.windows["0"].batches[0]
    model.zero_grad()
    _backward(model, pre)
    pre.layers["0"].chunks[0].a[0, 0] = float("inf")  # this step's input rows of layer 0
    grad = pre.layers["0"].grad_matrix().clone()
    with pytest.warns(RuntimeWarning, match="non-finite curvature rows"):
        pre.step()
    assert pre.windows["0"].batches[0] is kept
    torch.testing.assert_close(pre.layers["0"].grad_matrix(), grad)  # the plain gradient
    assert pre.layer_stats()["0"]["fallback"].startswith("non-finite curvature rows")


@pytest.mark.parametrize("solver", ["eigen", "lowrank"])
def test_the_one_read_step_skips_every_eigendecomposition_check(solver: str, monkeypatch) -> None:
    """Every eigendecomposition of the one-read step (the eigen and low-rank solvers, the embedding's
    closed form) leaves its check to the step's read; K-FAC (checks as it goes) keeps them."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(30, 12), nn.Linear(12, 10)

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(i).mean(1))

    seen: list[bool] = []
    real = kron.eigh

    def recording(matrix: torch.Tensor, *, check: bool = True):
        seen.append(check)
        return real(matrix, check=check)

    monkeypatch.setattr(kron, "eigh", recording)
    torch.manual_seed(0)
    for make in (lambda m: cgfac.CGFAC(m, solver=solver), lambda m: cgfac.KFAC(m)):
        model = Tagger()
        pre = make(model)
        idx = torch.randint(0, 30, (16, 5), generator=torch.Generator().manual_seed(4))
        F.cross_entropy(model(idx), torch.randint(0, 10, (16,))).backward()
        seen.clear()
        pre.step()
        assert seen and all(c is isinstance(pre, cgfac.KFAC) for c in seen), seen
        if isinstance(pre, cgfac.CGFAC):
            assert pre.layer_stats()["emb"]["method"] == "diag-kron"
            assert pre.layer_stats()["out"]["method"] == solver
