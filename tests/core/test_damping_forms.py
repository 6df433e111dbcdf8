"""Factored Tikhonov damping (every solve path) and K-FAC's factor warm-up, against dense float64
references built with ``torch.kron``."""

from __future__ import annotations

import pytest
import torch
from reference import Case, capture, cases, covered, factors, mean_grad, unvec, vec
from torch import nn

import cgfac
from cgfac.curvature.kron import KronEigen, KronRows, factored_damping
from cgfac.solvers.pcg import cg

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


@pytest.mark.parametrize("rows", [3, 12], ids=["fewer-rows", "more-rows"])
def test_kron_paths_equal_dense_factored_solve(rows):
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 6, 4
    a = torch.randn(rows, d_in, generator=gen, dtype=torch.float64) * 2.0
    g = torch.randn(rows, d_out, generator=gen, dtype=torch.float64) * 0.3
    grad = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    op = KronRows(a, g)
    a_f, g_f = op.factors()
    want = dense_factored(a_f, g_f, grad, DAMPING)
    gamma_a, gamma_g = gammas(a_f, g_f, DAMPING)
    assert op.factored_damping(DAMPING) == pytest.approx((gamma_a, gamma_g), rel=1e-12)
    assert gamma_a / gamma_g != pytest.approx(1.0)  # π ≠ 1: the split matters in this case
    # The operator and its diagonal.
    v = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    dense = torch.kron(a_f + gamma_a * torch.eye(d_in, dtype=a.dtype), g_f + gamma_g * torch.eye(d_out, dtype=a.dtype))
    torch.testing.assert_close(op.matvec(v, DAMPING, form="factored"), unvec(dense @ vec(v), v.shape),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.jacobi(DAMPING, form="factored"), unvec(torch.diagonal(dense), v.shape),
                               rtol=1e-12, atol=1e-12)
    # Low-rank, eigen and CG.
    torch.testing.assert_close(op.solve_lowrank(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    eig = KronEigen.from_factors(a_f, g_f)
    torch.testing.assert_close(eig.solve(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    # Square-ish sides: the damped inverses are built once per λ and reused; another λ rebuilds them.
    assert eig._inverses is not None and eig._inverses[0] == DAMPING
    torch.testing.assert_close(eig.solve(grad, DAMPING, form="factored"), want, rtol=1e-9, atol=1e-10)
    grad2 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(eig.solve(grad2, DAMPING, form="factored"),
                               dense_factored(a_f, g_f, grad2, DAMPING), rtol=1e-9, atol=1e-10)
    for _ in range(2):
        torch.testing.assert_close(eig.solve(grad, 3 * DAMPING, form="factored"),
                                   dense_factored(a_f, g_f, grad, 3 * DAMPING), rtol=1e-9, atol=1e-10)
    assert eig._inverses[0] == 3 * DAMPING
    # Very unequal sides: the eigenbasis products, no inverses.
    wide = KronEigen.from_factors(torch.eye(40, dtype=torch.float64) + a_f.new_ones(40, 40) / 40, g_f[:2, :2])
    g_wide = torch.randn(2, 40, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(wide.solve(g_wide, DAMPING, form="factored"),
                               dense_factored(wide.q_a @ torch.diag(wide.s_a) @ wide.q_a.T, g_f[:2, :2], g_wide,
                                              DAMPING), rtol=1e-9, atol=1e-10)
    assert wide._inverses is None
    res = cg(lambda x: op.matvec(x, DAMPING, form="factored"), grad, max_iters=500, tol=1e-13,
             diag=op.jacobi(DAMPING, form="factored"))
    assert res.converged
    torch.testing.assert_close(res.x, want, rtol=1e-9, atol=1e-10)
    # The exact form is a different system.
    assert not torch.allclose(eig.solve(grad, DAMPING), want, rtol=1e-3)


def test_factored_damping_guards_zero_traces():
    assert factored_damping(0.0, 3, 2.0, 2, 4.0) == (2.0, 2.0)
    assert factored_damping(8.0, 2, 1.0, 1, 4.0) == pytest.approx((4.0, 1.0))


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


# --- K-FAC's factors from a subset of the batch --------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_kfac_curvature_samples_use_the_first_samples_only(name: str):
    """``curvature_samples=k``: the factors are those of the batch's first ``k`` entries (with the
    per-sample G scaling of the whole batch; a sequence's positions, which a Linear counts as its
    samples, all come with it), while the direction preconditions the whole batch's gradient.
    Every layer kind builds rows for the kept entries only (a convolution's patches included)."""
    case = CASES[name]
    x, y = case.x, case.y
    k = 2
    torch.manual_seed(0)
    model = case.make_model().double()
    ref = case.make_model().double()
    ref.load_state_dict(model.state_dict())
    rows = capture(case, ref)  # per-sample rows of the whole batch
    pre = cgfac.KFAC(model, damping=DAMPING, inv_update_steps=1, kl_clip=None, curvature_samples=k)
    model.zero_grad()
    case.loss(model(x), y).backward()
    batch = x.shape[0]
    for name_, helper in pre.layers.items():  # rows were built for the kept entries only
        (chunk,) = helper.chunks
        assert chunk.batch == k and chunk.a.shape[0] == k * (rows[name_][0].shape[0] // batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    for layer in covered(model):
        a_rows, g_rows, n = rows[layer]
        t = a_rows.shape[0] // batch  # rows per batch entry
        want_a, want_g = factors(a_rows[: k * t], g_rows[: k * t], k * (n // batch))
        a_f, g_f = pre.factors[layer]
        torch.testing.assert_close(a_f, want_a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_f, want_g, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(a_f, factors(*rows[layer])[0])  # the subset differs from the batch
    assert any(not torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="curvature_samples"):
        cgfac.KFAC(case.make_model(), curvature_samples=0)


@pytest.mark.parametrize("method", ["kfac", "cgfac"])
def test_curvature_samples_true_fisher_rows_are_the_full_batch_rows_kept(method: str):
    """With the true Fisher, the sampled backward's per-sample ``g`` of the kept samples equal
    those of a run keeping every sample (the mean over the whole batch is undone with its own
    count, not the kept one), for a convolution and a Linear, with replayed targets."""
    case = CASES["cnn-stride-pad"]
    k = 3
    torch.manual_seed(0)
    model = case.make_model().double()
    other = case.make_model().double()
    other.load_state_dict(model.state_dict())
    make = cgfac.KFAC if method == "kfac" else cgfac.CGFAC
    pres = [make(m, fisher="true", damping=DAMPING, kl_clip=None, curvature_samples=s)
            for m, s in ((model, k), (other, None))]
    out0 = model(case.x)
    targets = torch.randint(0, 3, (case.x.shape[0],), generator=torch.Generator().manual_seed(1))
    pres[0].sample_fisher(out0, "cross_entropy", targets=targets)
    pres[1].sample_fisher(other(case.x), "cross_entropy", targets=targets)
    for lname in pres[0].layers:
        got = pres[0].layers[lname].take_rows(mean_reduced=True, max_samples=None)
        full = pres[1].layers[lname].take_rows(mean_reduced=True, max_samples=None)
        assert got is not None and full is not None and got.n == k
        t = full.a.shape[0] // full.n
        torch.testing.assert_close(got.a, full.a[: k * t], rtol=0, atol=0)
        torch.testing.assert_close(got.g, full.g[: k * t], rtol=1e-12, atol=1e-14)


def test_curvature_samples_across_accumulated_micro_batches():
    """Two micro-batches of one step (gradient accumulation, each loss a mean divided by the
    number of micro-batches): ``curvature_samples=3`` keeps the first micro-batch's two entries and
    the second's first entry, with the whole step's per-sample scaling (4 samples)."""
    case = CASES["cnn-stride-pad"]  # 4 samples
    torch.manual_seed(0)
    model = case.make_model().double()
    ref = case.make_model().double()
    ref.load_state_dict(model.state_dict())
    rows = capture(case, ref)
    pre = cgfac.KFAC(model, damping=DAMPING, inv_update_steps=1, kl_clip=None, curvature_samples=3)
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (case.loss(model(case.x[part]), case.y[part]) / 2).backward()
    for layer, helper in pre.layers.items():
        got = helper.take_rows(mean_reduced=True, max_samples=3)
        a_rows, g_rows, n = rows[layer]
        t = a_rows.shape[0] // 4
        assert got is not None and got.a.shape[0] == 3 * t and got.n == 3 * (n // 4)
        torch.testing.assert_close(got.a, a_rows[: 3 * t], rtol=0, atol=0)
        torch.testing.assert_close(got.g, g_rows[: 3 * t], rtol=1e-12, atol=1e-14)
