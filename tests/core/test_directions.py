"""Every solve path against ``torch.linalg.solve`` on the dense damped system (float64)."""

from __future__ import annotations

import pytest
import torch
from preconditioners import DAMPING, PRECONDITIONERS, preconditioned_grads
from reference import (
    Case,
    capture,
    cases,
    dense_kron,
    exact_fisher,
    factors,
    mean_grad,
    per_sample_grads,
    unvec,
    vec,
)

import cgfac

CASES = cases()


def dense_directions(case: Case, model: torch.nn.Module, exact: bool) -> dict[str, torch.Tensor]:
    """``(A ⊗ G + λI)⁻¹ vec ∇W`` or ``(F + λI)⁻¹ vec ∇W`` per layer, by ``torch.linalg.solve``."""
    grads = mean_grad(case, model)
    out = {}
    if exact:
        for name, j in per_sample_grads(case, model).items():
            system = exact_fisher(j) + DAMPING * torch.eye(j.shape[1] * j.shape[2], dtype=j.dtype)
            out[name] = unvec(torch.linalg.solve(system, vec(grads[name])), grads[name].shape)
    else:
        for name, (a, g, n) in capture(case, model).items():
            a_f, g_f = factors(a, g, n)
            system = dense_kron(a_f, g_f) + DAMPING * torch.eye(a_f.shape[0] * g_f.shape[0], dtype=a.dtype)
            out[name] = unvec(torch.linalg.solve(system, vec(grads[name])), grads[name].shape)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", list(PRECONDITIONERS))
def test_direction_matches_dense_solve(case: Case, kind: str) -> None:
    torch.manual_seed(0)
    model = case.make_model().double()
    want = dense_directions(case, model, exact="exact" in kind)
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    got = preconditioned_grads(model)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)
        assert "fallback" not in pre.layer_stats()[name]
    if kind.endswith("-cg") or kind.endswith("nojacobi"):
        for st in pre.layer_stats().values():
            assert st["method"] == "cg" and st["converged"] and st["rel_residual"] <= 1e-13


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
