"""The quadratic model (:mod:`cgfac.optim.quadratic`): the coefficients against a direct minimisation, and
the model's schedule (``quad_every``): the rule on its own, and the optimizer's steps between
evaluations, which reuse the last (α, μ) with this step's direction (float64, values); its checkpoint
round trip is ``tests/optim/test_base.py::test_state_dict_round_trip[kfac-quad-every]``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgfac
from cgfac.optim.quadratic import ModelSchedule, solve_coefficients


def test_coefficients_minimise_the_model() -> None:
    damped = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    lin = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    alpha, mu = solve_coefficients(damped, lin, "lr+momentum", True, 0.9) or (0.0, 0.0)
    c = torch.tensor([alpha, mu], dtype=torch.float64)
    torch.testing.assert_close(damped @ c + lin, torch.zeros(2, dtype=torch.float64), atol=1e-14, rtol=0)
    # α alone with μ fixed: ∂/∂α of ½cᵀMc + linᵀc = 0 at c = (α, 0.9)
    alpha, mu = solve_coefficients(damped, lin, "lr", True, 0.9) or (0.0, 0.0)
    assert mu == 0.9
    assert float(damped[0, 0] * alpha + damped[0, 1] * mu + lin[0]) == pytest.approx(0.0, abs=1e-14)
    alpha, mu = solve_coefficients(damped, lin, "lr+momentum", False, 0.9) or (0.0, 0.0)
    assert (alpha, mu) == (pytest.approx(0.5), 0.0)


def test_no_finite_minimum() -> None:
    lin = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert solve_coefficients(torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), lin, "lr", False,
                              0.0) is None
    assert solve_coefficients(torch.tensor([[math.nan, 0.0], [0.0, 1.0]], dtype=torch.float64), lin, "lr", False,
                              0.0) is None


def test_period_doubles_while_coefficients_hold_and_resets_when_they_move() -> None:
    s = ModelSchedule(every=4, tolerance=0.1)
    assert s.due(0, False)  # nothing recorded yet
    s.record(0, (1.0, 0.5))
    assert s.period == 1 and s.due(1, False)
    s.record(1, (1.05, 0.52))  # within 10 %
    assert s.period == 2 and not s.due(2, False) and s.due(3, False)
    assert s.due(2, True)  # a due damping check forces it
    s.record(3, (1.0, 0.5))
    assert s.period == 4 and not s.due(6, False) and s.due(7, False)
    s.record(7, (1.0, 0.5))
    assert s.period == 4  # capped at every
    s.record(11, (1.5, 0.5))  # α moved by a third
    assert s.period == 1 and s.due(12, False)
    s.reset()
    assert s.coeffs is None and s.period == 1 and s.due(13, False)
    one = ModelSchedule(every=1)
    one.record(0, (1.0, 0.5))
    one.record(1, (1.0, 0.5))
    assert all(one.due(k, False) for k in range(2, 6))  # every = 1: every step


def _setup(quad_every: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
    opt = cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=0.1, factor_decay=0.0, inv_update_steps=1,
                           adapt_damping=False, quad_every=quad_every, quad_tol=10.0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return model, opt, closure


def test_evaluations_follow_the_period() -> None:
    """quad_tol=10 keeps every period growing: evaluations on steps 0, 1, 3, 7 (periods 1, 2, 4, 4);
    the other steps reuse the last evaluation's (α, μ)."""
    _, opt, closure = _setup(quad_every=4)
    calls = []
    original = opt._curvature_gram
    opt._curvature_gram = lambda vectors: calls.append(opt.steps) or original(vectors)  # type: ignore[method-assign]
    for step in range(9):
        opt.step(closure)
        if step in (0, 1, 3, 7):
            assert "model_reused" not in opt.last
        else:
            assert opt.last["model_reused"] == 1.0
            assert (opt.last["alpha"], opt.last["mu"]) == opt.schedule.coeffs
    assert calls == [0, 1, 3, 7]


def test_reused_update_equals_alpha_times_the_direction_plus_mu_times_the_previous() -> None:
    """Against a second optimizer that evaluates the model every step but is handed the same (α, μ)."""
    model, opt, closure = _setup(quad_every=4)
    for _ in range(2):  # evaluations on steps 0 and 1; step 2 reuses
        opt.step(closure)
    alpha, mu = opt.schedule.coeffs
    prev = {p: opt.state[p]["prev_update"].clone() for p in model.parameters()}
    before = {p: p.detach().clone() for p in model.parameters()}
    # the direction Δ of step 2: the preconditioner alone on the same gradient, at the same point
    ref_model, ref_opt, ref_closure = _setup(quad_every=1)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    ref_closure()
    ref_opt.preconditioner.damping.value = ref_opt.damping
    ref_opt.preconditioner.step()
    delta = {n: -p.grad.clone() for n, p in ref_model.named_parameters()}
    opt.step(closure)
    assert opt.last["model_reused"] == 1.0
    for (n, p) in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[p], alpha * delta[n] + mu * prev[p], rtol=1e-10, atol=1e-13)


def test_a_changed_damping_or_a_due_check_forces_an_evaluation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
    opt = cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=0.1, factor_decay=0.0, inv_update_steps=1,
                           damping_interval=3, damping_decay=0.8, quad_every=8, quad_tol=0.2)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for step in range(12):
        damping = opt.damping
        opt.step(closure)
        if (step + 1) % 3 == 0:  # the LM check is due: the model was evaluated, ρ computed
            assert "model_reused" not in opt.last and "rho" in opt.last
            moved = abs(math.log(opt.damping / damping)) > math.log1p(0.2)  # a change is 0.8³ or 0.8⁻³
            assert moved == (opt.schedule.coeffs is None)  # λ moved past 1 + quad_tol: evaluate again
        else:
            assert "rho" not in opt.last


@pytest.mark.parametrize("kwargs,match", [({"quad_every": 0}, "quad_every"), ({"quad_tol": -0.1}, "quad_tol"),
                                          ({"quad_every": 1.5}, "quad_every")])
def test_bad_schedule_arguments(kwargs, match) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises((ValueError, TypeError), match=match):
        cgfac.optim.KFAC(model, loss_type="mse", **kwargs)
