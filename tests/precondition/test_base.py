"""The preconditioner's step (:mod:`cgfac.precondition.base`): solve dtype, fallbacks to the plain
gradient, factored damping and the rank damping scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import Case, capture, cases, covered, factors, mean_grad, unvec, vec
from torch import nn

import cgfac
from cgfac.curvature.kron import KronRows


def test_solve_dtype_float64_on_a_float32_model() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = []
    for dtype, model_dtype in [(None, torch.float64), (torch.float64, torch.float32)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(model_dtype)
        pre = cgfac.CGFAC(model, solve_dtype=dtype, damping=1e-4, kl_clip=None, solver="lowrank")
        F.cross_entropy(model(x.to(model_dtype)), y).backward()
        pre.step()
        grads.append(model[0].weight.grad.double())
    assert grads[1].dtype == torch.float64
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)  # float32 inputs, float64 solve
    with pytest.raises(TypeError, match="solve_dtype"):
        cgfac.CGFAC(nn.Linear(2, 2), solve_dtype=torch.int32)


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


CASES = {c.name: c for c in cases()}


DAMPING = 0.05


def gammas(a_f: torch.Tensor, g_f: torch.Tensor, damping: float) -> tuple[float, float]:
    pi = ((torch.trace(a_f) / a_f.shape[0]) / (torch.trace(g_f) / g_f.shape[0])).sqrt().item()
    return pi * damping**0.5, damping**0.5 / pi


def dense_factored(a_f: torch.Tensor, g_f: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """``((A + γ_A I) ⊗ (G + γ_G I))⁻¹ vec ∇W`` by ``torch.linalg.solve``."""
    gamma_a, gamma_g = gammas(a_f, g_f, damping)
    system = torch.kron(a_f + gamma_a * torch.eye(a_f.shape[0], dtype=a_f.dtype),
                        g_f + gamma_g * torch.eye(g_f.shape[0], dtype=g_f.dtype))
    return unvec(torch.linalg.solve(system, vec(grad)), grad.shape)


PRECONDITIONERS = {
    "kfac": lambda m: cgfac.KFAC(m, damping=DAMPING, factor_decay=0.0, inv_update_steps=1, kl_clip=None,
                                 damping_form="factored"),
    "cgfac-cg": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="cg", cg_tol=1e-13,
                                      cg_max_iters=2000, damping_form="factored"),
    "cgfac-lowrank": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="lowrank",
                                           damping_form="factored"),
    "cgfac-eigen": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="eigen",
                                         damping_form="factored"),
}


def layer_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in covered(model).items():
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        out[name] = torch.cat([w, m.bias.grad[:, None]], 1) if m.bias is not None else w
    return out


@pytest.mark.parametrize("case", [CASES["mlp-bias"], CASES["cnn-stride-pad"]], ids=lambda c: c.name)
@pytest.mark.parametrize("kind", list(PRECONDITIONERS))
def test_preconditioners_factored_match_dense(case: Case, kind: str):
    torch.manual_seed(0)
    model = case.make_model().double()
    grads = mean_grad(case, model)
    want = {}
    for name, (a, g, n) in capture(case, model).items():
        a_f, g_f = factors(a, g, n)
        want[name] = dense_factored(a_f, g_f, grads[name], DAMPING)
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    pre.step()
    got = layer_grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)
        assert pre.layer_stats()[name]["damping_form"] == "factored"


def test_factored_argument_checks_and_non_kron_layers():
    with pytest.raises(ValueError, match="curvature='kron'"):
        cgfac.CGFAC(nn.Linear(2, 2), curvature="exact", damping_form="factored")
    with pytest.raises(ValueError, match="damping_form"):
        cgfac.KFAC(nn.Linear(2, 2), damping_form="pi")
    with pytest.raises(ValueError, match="factor_warmup"):
        cgfac.KFAC(nn.Linear(2, 2), factor_warmup="identity")
    # An embedding (diagonal input factor) keeps its exact damping; the Linear layer is factored.
    idx = torch.randint(0, 7, (10,), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    directions = {}
    for form in ("exact", "factored"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        pre = cgfac.KFAC(model, damping=DAMPING, factor_decay=0.0, inv_update_steps=1, kl_clip=None,
                         damping_form=form)
        nn.functional.cross_entropy(model(idx), y).backward()
        pre.step()
        directions[form] = [p.grad.clone() for p in model.parameters()]
        assert ("damping_form" in pre.layer_stats()["2"]) == (form == "factored")
        assert "damping_form" not in pre.layer_stats()["0"]
    assert torch.equal(directions["exact"][0], directions["factored"][0])
    assert not torch.allclose(directions["exact"][1], directions["factored"][1])


def test_optimizer_accepts_damping_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = cgfac.optim.CGFAC(model, loss_type="gaussian", damping=0.1, solver="cg", damping_form="factored")
    assert opt.preconditioner.damping_form == "factored"
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        loss.backward()
        return loss
    first = float(closure().detach())
    for _ in range(3):
        opt.step(closure)
    assert float(closure().detach()) < first


def _step(**kwargs: object) -> tuple[nn.Module, cgfac.CGFAC]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 6, (9,), generator=torch.Generator().manual_seed(2))
    pre = cgfac.CGFAC(model, damping=DAMPING, kl_clip=None, curvature_samples=3, damping_scale="rank", **kwargs)
    F.cross_entropy(model(x), y).backward()
    grads = {name: h.grad_matrix().clone() for name, h in pre.layers.items()}
    pre.step()
    return model, pre, grads


@pytest.mark.parametrize("solver", ["lowrank", "cg", "eigen"])
def test_rank_damping_matches_the_dense_spectrum(solver: str) -> None:
    _, pre, grads = _step(solver=solver, cg_tol=1e-13, cg_max_iters=5000)
    for name, helper in pre.layers.items():
        rows = pre.windows[name].batches[0]
        a_factor, g_factor = KronRows.from_rows([rows], [1.0]).factors()
        dense = torch.kron(a_factor, g_factor)  # vec(G X A) = (A ⊗ G) vec X, column-major vec
        eig = torch.linalg.eigvalsh(dense)
        rank = int((eig > 1e-10 * eig.max()).sum())
        assert rank == min(3, helper.d_in) * min(3, helper.d_out) < dense.shape[0]  # few rows: low rank
        scale = float(eig.sum()) / rank
        st = pre.layer_stats()[name]
        assert st["damping"] == pytest.approx(DAMPING * scale, rel=1e-10)
        b = grads[name].T.reshape(-1)
        want = torch.linalg.solve(dense + DAMPING * scale * torch.eye(dense.shape[0], dtype=dense.dtype), b)
        got = helper.grad_matrix()
        torch.testing.assert_close(got, want.reshape(helper.d_in, helper.d_out).T, rtol=1e-7, atol=1e-9)


def test_rank_scale_differs_from_relative_by_dim_over_rank() -> None:
    _, rank_pre, _ = _step(solver="lowrank")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 6, (9,), generator=torch.Generator().manual_seed(2))
    rel = cgfac.CGFAC(model, damping=DAMPING, kl_clip=None, curvature_samples=3, damping_scale="relative",
                      solver="lowrank")
    F.cross_entropy(model(x), y).backward()
    rel.step()
    for name, helper in rel.layers.items():
        dims = helper.d_in * helper.d_out
        rank = min(3, helper.d_in) * min(3, helper.d_out)
        assert rank_pre.layer_stats()[name]["damping"] == pytest.approx(
            rel.layer_stats()[name]["damping"] * dims / rank, rel=1e-10)


def test_rank_is_a_damping_scale_option() -> None:
    with pytest.raises(ValueError, match="damping_scale"):
        cgfac.CGFAC(nn.Linear(3, 2), damping_scale="ranked")  # type: ignore[arg-type]
