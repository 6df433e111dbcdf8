"""Settings that make the step vanish (a KL clip with ν ≈ 0, damping swamping the curvature) are
reported in ``layer_stats()`` and warned about once."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import capture, cases, factors

import cgfac

CASE = cases()[0]  # mlp-bias, cross-entropy


def run(make, steps: int = 2):
    torch.manual_seed(0)
    model = CASE.make_model().double()
    pre = make(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            model.zero_grad()
            CASE.loss(model(CASE.x), CASE.y).backward()
            pre.step()
    return model, pre, [w for w in caught if "vanishes" in str(w.message)]


def test_kl_clip_vanishing_reported_once():
    _, pre, caught = run(lambda m: cgfac.KFAC(m, damping=0.05, kl_clip=1e-14, lr=1.0, inv_update_steps=1))
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "kl_clip" in message and "n²" in message and "kfac-pytorch" in message
    for st in pre.layer_stats().values():
        assert st["kl_scale"] < 1e-3 and "kl_clip" in st["step_vanishes"]


def test_damping_swamping_curvature_reported():
    for make in (lambda m: cgfac.KFAC(m, damping=1e5, kl_clip=None, inv_update_steps=1, factor_decay=0.0),
                 lambda m: cgfac.CGFAC(m, damping=1e5, kl_clip=None, solver="cg")):
        model, pre, caught = run(make)
        assert len(caught) == 1
        assert "damping" in str(caught[0].message) and "lower damping" in str(caught[0].message)
        torch.manual_seed(0)
        ref = CASE.make_model().double()
        ref.load_state_dict(model.state_dict())
        for name, (a, g, n) in capture(CASE, ref).items():
            a_f, g_f = factors(a, g, n)
            st = pre.layer_stats()[name]
            assert st["curvature_bound"] == pytest.approx(float(torch.trace(a_f) * torch.trace(g_f)), rel=1e-9)
            assert st["curvature_bound"] * 1e3 < 1e5
            assert "damping" in st["step_vanishes"]


def test_ordinary_settings_not_reported():
    _, pre, caught = run(lambda m: cgfac.KFAC(m, damping=0.05, kl_clip=1e-2, lr=0.1, inv_update_steps=1))
    assert caught == []
    for st in pre.layer_stats().values():
        assert "step_vanishes" not in st and 1e-3 <= st["kl_scale"] <= 1.0
    _, pre, caught = run(lambda m: cgfac.CGFAC(m, damping=0.05, kl_clip=None, solver="cg"))
    assert caught == [] and all("kl_scale" not in st for st in pre.layer_stats().values())
