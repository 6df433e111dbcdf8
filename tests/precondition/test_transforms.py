"""The direction stages (:mod:`cgfac.precondition.transforms`): the KL clip, the vanishing-step reports,
and a new stage, the README's worked example ("Where to add things"): one class with ``phase``,
``apply``, ``state_dict`` and ``load_state_dict``, appended to ``pre.stages``; the step applies it
and checkpoints carry its state inside each layer's entry."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from preconditioners import DAMPING, dense_directions, preconditioned_grads
from reference import (
    capture,
    cases,
    factors,
    mean_grad,
)
from torch import nn

import cgfac
from cgfac.precondition.transforms import Phase, StepData


class NormCap:
    """Caps each held direction's Frobenius norm at ``cap``; counts, per layer, the steps it did."""

    phase: Phase = "held"

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.capped: dict[str, int] = {}

    def apply(self, step: StepData) -> None:
        for name, x in step.directions.items():
            if x is not None and step.holds(name):
                norm = float(x.norm())
                if norm > self.cap:
                    x.mul_(self.cap / norm)
                    self.capped[name] = self.capped.get(name, 0) + 1

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {"capped": count} for name, count in self.capped.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None:
        self.capped = {name: entry["capped"] for name, entry in state.items() if "capped" in entry}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def step(pre: cgfac.Preconditioner, net: nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    pre.step()
    return [p.grad.clone() for p in net.parameters()]


def test_a_new_stage_is_applied_at_its_phase_and_checkpointed() -> None:
    plain_net, capped_net = model(), model()
    plain = cgfac.CGFAC(plain_net, solver="eigen", kl_clip=None, damping=1e-2)
    capped = cgfac.CGFAC(capped_net, solver="eigen", kl_clip=None, damping=1e-2)
    cap = NormCap(0.5)
    capped.stages.append(cap)
    reference, result = step(plain, plain_net), step(capped, capped_net)
    for name, (w_ref, b_ref), (w, b) in zip(["0", "2"], zip(reference[::2], reference[1::2]),
                                            zip(result[::2], result[1::2])):
        x_ref, x = torch.cat([w_ref, b_ref[:, None]], 1), torch.cat([w, b[:, None]], 1)
        norm = float(x_ref.norm())
        expected = x_ref * min(1.0, 0.5 / norm)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-14)
        assert cap.capped.get(name, 0) == (1 if norm > 0.5 else 0)
    assert cap.capped  # the cap binds on at least one layer of this example
    state = capped.state_dict()
    assert {name: entry["capped"] for name, entry in state["layers"].items() if "capped" in entry} == cap.capped
    fresh = cgfac.CGFAC(model(), solver="eigen", kl_clip=None, damping=1e-2)
    restored = NormCap(0.5)
    fresh.stages.append(restored)
    fresh.load_state_dict(state)
    assert restored.capped == cap.capped


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


CASES = cases()


def test_kl_clip_scales_direction() -> None:
    """With a tiny κ the step is ν·X with ν = √(κ / (lr² Σ⟨X, ∇W⟩))."""
    case = CASES[0]
    torch.manual_seed(0)
    model = case.make_model().double()
    grads = mean_grad(case, model)
    want = dense_directions(case, model, exact=False)
    vg = sum(float((want[n] * grads[n]).sum()) for n in want) * 0.5**2
    nu = (1e-6 / vg) ** 0.5
    assert nu < 1
    pre = cgfac.KFAC(model, damping=DAMPING, factor_decay=0.0, inv_update_steps=1, kl_clip=1e-6, lr=0.5)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    for name, g in preconditioned_grads(model).items():
        torch.testing.assert_close(g, nu * want[name], rtol=1e-8, atol=1e-12)
