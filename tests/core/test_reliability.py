"""Failure modes: exact resume, non-finite values, accumulation, mixed precision, properties."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cgfac
from cgfac.curvature.kron import KronRows


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


@pytest.mark.parametrize("field", ["a", "g"])
@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_non_finite_rows_fall_back_to_plain_gradient(cls, field: str) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cls(model)
    one_backward(model)
    getattr(pre.layers["3"].chunks[0], field)[0, 0] = float("nan")
    plain = model[3].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="layer '3' keeps its plain gradient"):
        pre.step()
    assert torch.equal(model[3].weight.grad, plain)
    assert "non-finite curvature rows" in pre.layer_stats()["3"]["fallback"]
    assert pre.fallbacks == 1 and "fallback" not in pre.layer_stats()["0"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cg_breakdown_falls_back_to_plain_gradient(monkeypatch) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cgfac.CGFAC(model, solver="cg")
    one_backward(model)
    monkeypatch.setattr(KronRows, "matvec", lambda self, v, damping: v * float("nan"))
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="CG breakdown"):
        pre.step()
    # the LayerNorm ("4") is solved directly (its exact per-feature blocks), not by CG
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters() if not n.startswith("4."))
    assert pre.fallbacks == 3


def test_eigendecomposition_retried_in_float64(monkeypatch) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cgfac.KFAC(model, kl_clip=None, damping=0.1)
    one_backward(model)
    pre.step()
    want = [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = net()
    pre = cgfac.KFAC(model, kl_clip=None, damping=0.1)
    one_backward(model)
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    pre.step()
    assert torch.float64 in calls and pre.fallbacks == 0
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_failed_decomposition_keeps_previous_or_falls_back(monkeypatch) -> None:
    torch.manual_seed(0)
    model = net()
    pre = cgfac.KFAC(model, inv_update_steps=1)

    def broken(m):
        raise torch.linalg.LinAlgError("broken")

    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    one_backward(model)
    plain = model[3].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="solve failed"):
        pre.step()
    assert torch.equal(model[3].weight.grad, plain) and pre.fallbacks == 3
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    one_backward(model, 1)
    pre.step()
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    one_backward(model, 2)
    pre.step()
    st3 = pre.layer_stats()["3"]
    assert "previous decomposition kept" in st3["decomposition_error"] and st3["decomposition_age"] == 1
    assert pre.fallbacks == 3 and all(torch.isfinite(p.grad).all() for p in model.parameters())


ACCUMULATING = {
    "cgfac-kron": lambda m: cgfac.CGFAC(m, kl_clip=None, solver="lowrank"),
    "cgfac-exact": lambda m: cgfac.CGFAC(m, curvature="exact", kl_clip=None, solver="lowrank"),
    "kfac": lambda m: cgfac.KFAC(m, kl_clip=None, factor_decay=0.0, inv_update_steps=1),
}


@pytest.mark.parametrize("kind", list(ACCUMULATING))
def test_gradient_accumulation_equals_one_big_batch(kind: str) -> None:
    """Micro-batches with ``loss / k`` before one ``step()`` = one backward over the whole batch."""
    x, y = batch(0, n=12)
    results = []
    for parts in (1, 3):
        torch.manual_seed(0)
        model = net().double()
        pre = ACCUMULATING[kind](model)
        for xs, ys in zip(x.double().chunk(parts), y.chunk(parts)):
            F.cross_entropy(model(xs), ys).div(parts).backward()
        pre.step()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_true_fisher_accumulation_gives_per_sample_rows() -> None:
    """Sampled micro-batches: every last-layer row is ``softmax(z) − e_ŷ`` (no 1/k, no 1/n left)."""
    torch.manual_seed(0)
    model = net()
    pre = cgfac.CGFAC(model, fisher="true")
    x, y = batch(0, n=12)
    probs = []
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        out = model(xs)
        pre.sample_fisher(out, "cross_entropy")
        probs.append(torch.softmax(out.detach(), -1))
        F.cross_entropy(out, ys).div(3).backward()
    rows = pre._rows(pre.layers["6"])
    onehot = torch.cat(probs) - rows.g
    assert rows.n == 12 and torch.allclose(onehot, onehot.round(), atol=1e-6)
    assert torch.allclose(onehot.sum(1), torch.ones(12), atol=1e-6)


@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_autocast_bfloat16_direction_close_to_float32(cls) -> None:
    directions = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = net()
        pre = cls(model, kl_clip=None, damping=1e-1)
        x, y = batch(0, n=32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        assert all(c.get("method") for c in pre.layer_stats().values())
        directions.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    ref, got = directions
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_grad_scaler_is_accounted_for() -> None:
    """``scaler.scale(loss).backward(); scaler.unscale_(opt); pre.step()`` = the unscaled step."""
    out = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        pre = cgfac.CGFAC(model, grad_scaler=scaler, solver="lowrank")
        x, y = batch(0)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        pre.step()
        out.append([p.grad.clone() for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 7), d_out=st.integers(1, 6), n=st.integers(1, 9), bias=st.booleans(),
    log_damping=st.floats(-3, 1), seed=st.integers(0, 2**16),
    kind=st.sampled_from(["kfac", "cg", "lowrank", "eigen", "exact-cg", "exact-lowrank"]),
)
def test_property_direction_matches_dense_solve(d_in, d_out, n, bias, log_damping, seed, kind) -> None:
    torch.manual_seed(seed)
    damping = 10.0**log_damping
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    x, t = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    kw = {"damping": damping, "kl_clip": None}
    if kind == "kfac":
        pre = cgfac.KFAC(layer, factor_decay=0.0, inv_update_steps=1, **kw)
    elif kind.startswith("exact"):
        pre = cgfac.CGFAC(layer, curvature="exact", solver=kind[6:], cg_tol=1e-12, cg_max_iters=500, **kw)
    else:
        pre = cgfac.CGFAC(layer, solver=kind, cg_tol=1e-12, cg_max_iters=500, **kw)
    (0.5 * (layer(x) - t).pow(2).sum(1).mean()).backward()
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) if bias else x
    g = layer(x).detach() - t  # per-sample output gradients of the squared error
    grad = g.T @ a / n
    if kind.startswith("exact"):
        jac = torch.einsum("so,si->sio", g, a).reshape(n, -1)  # column-major vec of g_s a_sᵀ
        system = jac.T @ jac / n
    else:
        system = torch.kron(a.T @ a / n, g.T @ g / n)
    system += damping * torch.eye(system.shape[0], dtype=system.dtype)
    want = torch.linalg.solve(system, grad.T.reshape(-1)).reshape(a.shape[1], d_out).T
    pre.step()
    got = layer.weight.grad if not bias else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    if kind.endswith("cg"):  # CG stops at relative residual 1e-12: error ≤ κ · 1e-12 (κ reaches 1e8 here)
        kappa = float(torch.linalg.eigvalsh(system)[-1]) / damping
        assert float((got - want).norm()) <= max(kappa, 1e3) * 1e-12 * float(want.norm()) + 1e-14
    else:
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_train_eval_train_uses_no_stale_rows(cls) -> None:
    """Evaluating under ``no_grad`` (train or eval mode) between steps changes nothing."""
    grads = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        model = net()
        pre = cls(model, **({"inv_update_steps": 1} if cls is cgfac.KFAC else {}))
        for step in range(2):
            if evaluate:
                with torch.no_grad():
                    model(batch(50 + step, n=5)[0])
                model.eval()
                with torch.no_grad():
                    model(batch(60 + step, n=7)[0])
                model.train()
            one_backward(model, step)
            pre.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_large_float16_gradients_are_not_mistaken_for_overflow() -> None:
    model = nn.Linear(300, 300).half()
    pre = cgfac.CGFAC(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 60000.0)  # finite, but their float16 sum would overflow
    assert pre._grads_finite()
    model.weight.grad[0, 0] = float("inf")
    assert not pre._grads_finite()
