"""``graft="rmsprop"``: each layer's direction at RMSProp's step length, against a float64
reference built from the plain directions of an identical preconditioner and the gradients."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import cgfac


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()


def batches(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(9, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (9,), generator=gen)) for _ in range(k)]


def grad_matrices(m: nn.Module) -> dict[str, torch.Tensor]:
    return {"0": torch.cat([m[0].weight.grad, m[0].bias.grad[:, None]], 1), "2": m[2].weight.grad.clone()}


MAKE = {"kfac": lambda m, **kw: cgfac.KFAC(m, damping=0.1, inv_update_steps=1, **kw),
        "cgfac": lambda m, **kw: cgfac.CGFAC(m, damping=0.1, solver="eigen", **kw)}


@pytest.mark.parametrize("method", list(MAKE))
def test_grafted_direction_has_rmsprop_length(method: str) -> None:
    beta2, eps = 0.9, 1e-6
    plain_model, graft_model = model(), model()
    plain = MAKE[method](plain_model, kl_clip=None)
    grafted = MAKE[method](graft_model, kl_clip=None, graft="rmsprop", graft_beta2=beta2, graft_eps=eps)
    v: dict[str, torch.Tensor] = {}
    for t, (x, y) in enumerate(batches(4), start=1):
        for m in (plain_model, graft_model):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        grads = grad_matrices(plain_model)
        plain.step()
        grafted.step()
        for name, g in grads.items():
            v[name] = beta2 * v.get(name, torch.zeros_like(g)) + (1 - beta2) * g**2
            rms_step = g / ((v[name] / (1 - beta2**t)).sqrt() + eps)
            x_plain = plain.layers[name].grad_matrix()
            want = x_plain * rms_step.norm() / x_plain.norm()
            torch.testing.assert_close(grafted.layers[name].grad_matrix(), want, rtol=1e-10, atol=1e-12)
            assert grafted.layer_stats()[name]["graft_scale"] == pytest.approx(float(rms_step.norm() / x_plain.norm()))
        # same parameters for both, so the next gradients are equal
        with torch.no_grad():
            for p, q in zip(plain_model.parameters(), graft_model.parameters()):
                q.copy_(p)


def test_graft_state_resumes_exactly() -> None:
    data = batches(5)

    def run(pre: cgfac.Preconditioner, m: nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in steps:
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            pre.step()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad

    m1 = model()
    p1 = cgfac.KFAC(m1, kl_clip=None, graft="rmsprop")
    run(p1, m1, data)
    m2 = model()
    p2 = cgfac.KFAC(m2, kl_clip=None, graft="rmsprop")
    run(p2, m2, data[:3])
    buf = io.BytesIO()
    torch.save({"pre": p2.state_dict(), "model": m2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["pre"]["layers"]["0"]["graft_steps"] == 3
    m3 = model()
    m3.load_state_dict(saved["model"])
    p3 = cgfac.KFAC(m3, kl_clip=None, graft="rmsprop")
    p3.load_state_dict(saved["pre"])
    run(p3, m3, data[3:])
    for a, b in zip(m1.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_graft_arguments_fail_loudly() -> None:
    m = model()
    with pytest.raises(ValueError, match="graft"):
        cgfac.KFAC(m, graft="adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="graft"):
        cgfac.KFAC(m, graft=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="graft_beta2"):
        cgfac.KFAC(m, graft="rmsprop", graft_beta2=1.0)
    with pytest.raises(ValueError, match="graft_eps"):
        cgfac.KFAC(m, graft="rmsprop", graft_eps=0.0)


def test_grafting_few_rows_on_a_wide_layer_warns_once() -> None:
    """Few rows on a wide layer: most of the direction is grad/damping outside the rows' span, and
    RMSProp's length on it diverged on the wide MLP; the step says so (once) and per layer."""
    import warnings as _w

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 5))
    x, y = torch.randn(32, 40), torch.randint(0, 5, (32,))
    few = cgfac.CGFAC(model, curvature_samples=4, kl_clip=None, graft="rmsprop")
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="graft='rmsprop' with 4 curvature rows"):
        few.step()
    assert "graft_rows" in few.layer_stats()["0"]  # 4 rows on a 60 x 41 layer
    assert "graft_rows" not in few.layer_stats()["2"]  # 4 rows on a 5 x 61 layer: at least half its smaller side
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with _w.catch_warnings():
        _w.simplefilter("error")
        few.step()  # warned once
    few.remove()
    enough = cgfac.CGFAC(model, kl_clip=None, graft="rmsprop")  # 32 rows: at least half of each smaller side
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with _w.catch_warnings():
        _w.simplefilter("error")
        enough.step()
    assert not any("graft_rows" in st for st in enough.layer_stats().values())
