"""K-FAC's running factors (:mod:`cgfac.curvature.running`): the warm-up of the averages."""

from __future__ import annotations

import pytest
import torch
from reference import Case, capture, cases, covered, factors

import cgfac

CASES = {c.name: c for c in cases()}
DAMPING = 0.05


# --- factor warm-up ------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", ["first", "mean"])
def test_factor_warmup(warmup):
    case = CASES["mlp-bias"]
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    torch.manual_seed(0)
    model = case.make_model().double()
    ref = case.make_model().double()
    ref.load_state_dict(model.state_dict())
    rho = 0.9
    pre = cgfac.KFAC(model, damping=DAMPING, factor_decay=rho, inv_update_steps=1, kl_clip=None,
                     factor_warmup=warmup)
    per_batch = []
    for x in batches:
        batch_case = Case(case.name, case.make_model, x, case.y, case.loss)
        per_batch.append({n: factors(*capture(batch_case, ref)[n]) for n in covered(ref)})
        model.zero_grad()
        case.loss(model(x), case.y).backward()
        pre.step()  # only .grad is replaced: the parameters are not changed
    for name in covered(model):
        a_f, g_f = pre.factors[name]
        want_a, want_g = per_batch[0][name]
        for t, fs in enumerate(per_batch[1:], start=1):
            decay = min(rho, 1 - 1 / (t + 1)) if warmup == "mean" else rho
            want_a = decay * want_a + (1 - decay) * fs[name][0]
            want_g = decay * want_g + (1 - decay) * fs[name][1]
        torch.testing.assert_close(a_f, want_a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_f, want_g, rtol=1e-12, atol=1e-14)
        if warmup == "mean":  # with ρ = 0.9 the first four batches are plainly averaged
            mean_a = sum(fs[name][0] for fs in per_batch) / 4
            torch.testing.assert_close(a_f, mean_a, rtol=1e-12, atol=1e-14)
    state = pre.state_dict()
    assert all(("factor_updates" in layer) == (warmup == "mean") for layer in state["layers"].values())
    if warmup == "mean":
        other = cgfac.KFAC(case.make_model().double(), factor_decay=rho, factor_warmup="mean")
        other.load_state_dict(state)
        assert other.factor_updates == {name: 4 for name in covered(model)}
