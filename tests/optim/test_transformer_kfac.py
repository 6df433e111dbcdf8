"""cgfac.optim.TransformerKFAC against dense float64 references (eigendecompositions, matrix powers,
the SVD's polar factor), torch.optim.Muon and AdamW, and its routing on Hugging Face models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import cgfac
from cgfac.optim.transformer_kfac import (
    NS_COEFFICIENTS,
    UPDATE_RMS,
    gram_form_cheaper,
    newton_schulz,
    ns_coefficients,
)

torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0) -> nn.Sequential:
    """Two hidden Linear layers and an output layer (which goes to AdamW), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 7, bias=True), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_power(f: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """``(F + λI)^p`` by the dense eigendecomposition of ``F + λI``."""
    s, q = torch.linalg.eigh(f + lam * torch.eye(f.shape[0], dtype=f.dtype))
    return (q * s.pow(p)) @ q.T


def polar(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def quintic(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(7, 4), (4, 9), (6, 6)])
def test_newton_schulz_is_the_quintic_on_the_singular_values(shape) -> None:
    """In float64, NS(m) = U f(S/‖m‖_F) Vᵀ exactly (f: the quintic map iterated), and it lies within
    the documented band of the polar factor UVᵀ."""
    m = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    got = newton_schulz(m, steps=5, dtype=torch.float64)
    want = (u * quintic(s / m.norm(), 5)) @ vh
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    sv = torch.linalg.svdvals(got)
    assert sv.min() > 0.6 and sv.max() < 1.25  # the 5-step quintic's band around 1
    assert (got - polar(m)).abs().max() < 0.4
    torch.testing.assert_close(polar(got), polar(m), rtol=1e-9, atol=1e-10)  # the same singular vectors


def polar_express_map(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The Polar Express schedule (arXiv 2505.16932, Algorithm 1) on scalars, written out from the paper."""
    paper = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
             (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
             (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
             (3.3184196573706015, -2.488488024314874, 0.51004894012372),
             (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
             (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
             (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
             (1.875, -1.25, 0.375)]
    safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in paper[:-1]] + paper[-1:]
    for i in range(steps):
        a, b, c = safe[min(i, len(safe) - 1)]
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(7, 4), (4, 9), (6, 6)])
@pytest.mark.parametrize("steps", [4, 5, 6, 10])
def test_polar_express_is_its_schedule_on_the_singular_values(shape, steps) -> None:
    """In float64, NS(m) = U f(S/(1.01‖m‖_F)) Vᵀ with the paper's per-iteration quintics; from 6 steps
    on it is the polar factor within 0.01, and at 5 within the documented [0.84, 1.12] band."""
    m = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    got = newton_schulz(m, steps=steps, dtype=torch.float64, schedule="polar-express")
    torch.testing.assert_close(got, (u * polar_express_map(s / (1.01 * m.norm()), steps)) @ vh,
                               rtol=1e-10, atol=1e-12)
    sv = torch.linalg.svdvals(got)
    assert s.min() / m.norm() > 1e-3  # inside the schedule's design interval
    if steps >= 6:
        torch.testing.assert_close(got, polar(m), rtol=0, atol=1e-2)
    elif steps == 5:
        assert sv.min() > 0.84 and sv.max() < 1.125
    torch.testing.assert_close(polar(got), polar(m), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(5, 13), (13, 5), (6, 6), (3, 12)])
@pytest.mark.parametrize("schedule", ["jordan", "polar-express"])
@pytest.mark.parametrize("steps", [1, 4, 5])
def test_gram_form_is_the_plain_iteration(shape, schedule, steps) -> None:
    """The Gram form (R ← P R P, Q ← P Q, X = Q X₀) equals the plain iteration in float64; in float32,
    on a spectrum spread over three decades, it stays within 1e-4 of it on rectangular matrices (where
    "auto" takes it) and ten times closer than torch.optim.Muon's bfloat16 plain iteration everywhere
    (its float32 Gram matrix resolves σ² only to about 1e-7·σ_max²: square matrices lose more)."""
    g = torch.Generator().manual_seed(11)
    m = torch.randn(*shape, dtype=torch.float64, generator=g) @ torch.diag(
        torch.logspace(-3, 0, shape[1], dtype=torch.float64))
    plain = newton_schulz(m, steps, dtype=torch.float64, schedule=schedule, form="plain")
    torch.testing.assert_close(newton_schulz(m, steps, dtype=torch.float64, schedule=schedule, form="gram"), plain,
                               rtol=1e-11, atol=1e-12)
    err_gram = (newton_schulz(m.float(), steps, dtype=torch.float32, schedule=schedule, form="gram") - plain).abs()
    err_bf16 = (newton_schulz(m.to(torch.bfloat16), steps, dtype=torch.bfloat16, schedule=schedule, form="plain")
                - plain).abs()
    assert err_gram.max() < err_bf16.max() / 10
    if shape[0] != shape[1]:
        assert err_gram.max() < 1e-4


def test_auto_form_takes_the_gram_form_where_it_costs_fewer_flops() -> None:
    # 2m²n + (4k-3)m³ against k(2m²n + m³): m = 256, k = 5
    assert gram_form_cheaper(256, 1024, 5, torch.float32) and gram_form_cheaper(1024, 256, 5, torch.float64)
    assert gram_form_cheaper(256, 512, 5, torch.float32)  # 4 + 17 = 21 < 25 (in m³)
    assert not gram_form_cheaper(256, 256, 5, torch.float32)  # 19 > 15
    assert not gram_form_cheaper(256, 1024, 5, torch.bfloat16)  # a bfloat16 Gram matrix loses small σ
    assert not gram_form_cheaper(256, 4096, 1, torch.float32)  # one step: 2m²n + m³ either way
    m = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(m, 5, dtype=torch.float64),
                               newton_schulz(m, 5, dtype=torch.float64, form="gram"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ns_form"):
        newton_schulz(m, 5, form="fast")
    with pytest.raises(ValueError, match="ns_form"):
        cgfac.optim.TransformerKFAC(mlp(), ns_form="fast")


def test_ns_schedule_is_checked_and_reaches_the_step() -> None:
    with pytest.raises(ValueError, match="ns_schedule"):
        cgfac.optim.TransformerKFAC(mlp(), ns_schedule="fast")
    with pytest.raises(ValueError, match="ns_schedule"):
        ns_coefficients("fast", 3)
    assert ns_coefficients("jordan", 2) == [NS_COEFFICIENTS] * 2
    x, y = batch(n=5)
    model, ref_model = mlp(), mlp()
    rows = captured(ref_model, x, y)
    nn.functional.cross_entropy(ref_model(x), y).backward()
    opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.0, power=-0.5, damping=0.07, momentum=0.0,
                                      ns_dtype=torch.float64, ns_steps=6, ns_schedule="polar-express")
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for i in (0, 2):
        w, a = ref_model[i].weight, rows[i][0]
        fa = a.T @ a / a.shape[0]
        m = w.grad @ dense_power(fa, 0.07 * float(torch.trace(fa)) / fa.shape[0], -0.5)
        want = w.detach() - 0.1 * UPDATE_RMS * math.sqrt(max(m.shape)) * newton_schulz(
            m, 6, dtype=torch.float64, schedule="polar-express")
        torch.testing.assert_close(model[i].weight.detach(), want, rtol=1e-9, atol=1e-11)


def captured(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{index: (inputs, output gradients)}`` of the model's Linear layers on one loss."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            def hook(mod, args, out, i=i):
                seen[i] = [args[0].detach()]
                out.register_hook(lambda g, i=i: seen[i].append(g.detach()))
            handles.append(m.register_forward_hook(hook))
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return {i: (v[0], v[1]) for i, v in seen.items()}


def reference_sides(sides: str, d_out: int, d_in: int) -> tuple[bool, bool]:
    """Whether a ``d_out × d_in`` layer's input and output factors are used: ``"smaller"`` takes the
    factor of the smaller dimension (the input's on a tie)."""
    if sides == "smaller":
        return d_in <= d_out, d_out < d_in
    return True, sides == "both"


def reference_ortho(model: nn.Sequential, x, y, *, lr, wd, damping, p, sides, mu=0.95) -> dict[int, torch.Tensor]:
    """One step of "ortho" by hand, dense float64: W ← W(1 − lr·wd) − lr·0.2·√max(m,n)·NS(P_G M P_A)."""
    rows = captured(model, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    out = {}
    for i in (0, 2):
        w = model[i].weight
        g = w.grad
        m = (1 - mu) * g + mu * (1 - mu) * g  # Nesterov, torch.optim.Muon's convention, first buffer (1-μ)g
        a, gg = rows[i]
        fa = a.T @ a / a.shape[0]
        use_a, use_g = reference_sides(sides, *m.shape)
        if use_a:
            m = m @ dense_power(fa, damping * float(torch.trace(fa)) / fa.shape[0], p)
        if use_g:
            fg = gg.T @ gg / gg.shape[0]
            m = dense_power(fg, damping * float(torch.trace(fg)) / fg.shape[0], p) @ m
        u = newton_schulz(m, 5, dtype=torch.float64) * UPDATE_RMS * math.sqrt(max(m.shape))
        out[i] = w.detach() * (1 - lr * wd) - lr * u
    model.zero_grad()
    return out


@pytest.mark.parametrize("sides", ["input", "both", "smaller"])
@pytest.mark.parametrize("factors", ["ema", "rows"])
def test_ortho_step_matches_the_dense_reference(sides: str, factors: str) -> None:
    x, y = batch(n=5)  # 5 rows < d: low-rank factors, exact through the rows' span
    model, ref_model = mlp(), mlp()
    want = reference_ortho(ref_model, x, y, lr=0.1, wd=0.3, damping=0.07, p=-0.5, sides=sides)
    opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.3, direction="ortho", sides=sides, power=-0.5,
                                      damping=0.07, factors=factors, ns_dtype=torch.float64)
    head_before = model[4].weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight.detach(), want[i], rtol=1e-9, atol=1e-11)
    assert not torch.equal(model[4].weight, head_before)  # the head moved by AdamW
    assert opt.routes == {"0.weight": "kron", "2.weight": "kron", "2.bias": "adamw", "4.weight": "adamw",
                          "4.bias": "adamw"}


def test_power_zero_is_torch_muon_and_the_rest_is_torch_adamw() -> None:
    """With ``power=0`` and Newton–Schulz in bfloat16 the hidden update is torch.optim.Muon's
    (match_rms_adamw), and the other parameters follow torch.optim.AdamW (wd on ≥ 2-D only)."""
    model, ref = mlp().float(), mlp().float()
    x, y = batch(n=16)
    x = x.float()
    opt = cgfac.optim.TransformerKFAC(model, lr=0.02, weight_decay=0.1, power=0.0, ns_dtype=torch.bfloat16,
                                      betas=(0.9, 0.99))
    hidden = [ref[0].weight, ref[2].weight]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [ref[4].weight], "weight_decay": 0.1},
                               {"params": [ref[2].bias, ref[4].bias], "weight_decay": 0.0}], lr=0.02,
                              betas=(0.9, 0.99))
    for _ in range(3):
        for o, mdl in ((opt, model), (None, ref)):
            nn.functional.cross_entropy(mdl(x), y).backward()
            if o is not None:
                o.step()
                o.zero_grad()
            else:
                muon.step()
                adamw.step()
                muon.zero_grad()
                adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_ekfac_steps_match_adam_in_the_eigenbasis() -> None:
    """Two "ekfac" steps by hand: m, v of the gradient rotated into the eigenbases of the running
    factors (decay β_f), bias-corrected Adam there, rotated back."""
    x1, y1 = batch(n=40, seed=1)  # full-rank factors: distinct eigenvalues, a unique eigenbasis
    x2, y2 = batch(n=40, seed=2)
    b1, b2, eps, lr, wd, fd = 0.9, 0.99, 1e-8, 0.05, 0.1, 0.8
    model, ref = mlp(), mlp()
    opt = cgfac.optim.TransformerKFAC(model, lr=lr, weight_decay=wd, direction="ekfac", sides="both",
                                      betas=(b1, b2), eps=eps, factor_decay=fd, eig_every=1)
    state: dict[int, dict[str, torch.Tensor]] = {0: {}, 2: {}}
    rest = torch.optim.AdamW([{"params": [ref[4].weight], "weight_decay": wd},
                              {"params": [ref[2].bias, ref[4].bias], "weight_decay": 0.0}], lr=lr, betas=(b1, b2),
                             eps=eps)
    for t, (x, y) in enumerate(((x1, y1), (x2, y2)), start=1):
        rows = captured(ref, x, y)
        nn.functional.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for i in (0, 2):
                s = state[i]
                a, g = rows[i]
                fa, fg = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
                s["A"] = fa if t == 1 else fd * s["A"] + (1 - fd) * fa
                s["G"] = fg if t == 1 else fd * s["G"] + (1 - fd) * fg
                qa, qg = torch.linalg.eigh(s["A"])[1], torch.linalg.eigh(s["G"])[1]
                grad = ref[i].weight.grad
                s["m"] = (1 - b1) * grad + (b1 * s["m"] if t > 1 else 0)
                rot = qg.T @ grad @ qa
                s["v"] = (1 - b2) * rot**2 + (b2 * s["v"] if t > 1 else 0)
                u = (qg.T @ s["m"] @ qa) / (1 - b1**t) / ((s["v"] / (1 - b2**t)).sqrt() + eps)
                ref[i].weight.mul_(1 - lr * wd).sub_(lr * qg @ u @ qa.T)
        rest.step()
        ref.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    # eigenvectors are defined up to sign; the update is invariant to it, so the weights must agree
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=name)


def test_power_direction_has_the_update_rms() -> None:
    model = mlp()
    x, y = batch()
    opt = cgfac.optim.TransformerKFAC(model, lr=1.0, weight_decay=0.0, direction="power", sides="both", power=-0.25)
    before = model[0].weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    step = before - model[0].weight.detach()
    assert step.pow(2).mean().sqrt().item() == pytest.approx(UPDATE_RMS, rel=1e-9)


# the full state; the compact one (factor_every == eig_every); low-rank running factors (a power: "ortho")
@pytest.mark.parametrize(("factor_every", "rank", "direction"), [
    (1, None, "ortho"), (2, None, "ortho"), (1, None, "spectral"), (2, None, "spectral"), (1, 4, "ortho")])
def test_state_dict_resumes_bit_for_bit(factor_every: int, rank: int | None, direction: str) -> None:
    x, y = batch(n=12)

    def make():
        model = mlp()
        return model, cgfac.optim.TransformerKFAC(model, lr=0.05, rows=6, sides="both", eig_every=2,
                                                  factor_every=factor_every, direction=direction, rank=rank)

    def steps(model, opt, k):
        for _ in range(k):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    model, opt = make()
    steps(model, opt, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    steps(model, opt, 3)
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    steps(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_newton_muon_power_step_matches_the_dense_reference() -> None:
    """``power=-1`` (the Cholesky path) on both sides, running factors: one step equals the dense reference."""
    x, y = batch(n=5)
    model, ref_model = mlp(), mlp()
    want = reference_ortho(ref_model, x, y, lr=0.1, wd=0.3, damping=0.07, p=-1.0, sides="both")
    opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.3, sides="both", power=-1.0, damping=0.07,
                                      ns_dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight.detach(), want[i], rtol=1e-9, atol=1e-11)


def reference_spectral(model: nn.Sequential, x, y, *, lr, wd, damping, sides, mu=0.95) -> dict[int, torch.Tensor]:
    """One "spectral" step by hand, dense float64 with symmetric roots (no Cholesky):
    ``O = B_G^{-1/2} NS(B_G^{-1/2} M B_A^{-1/2}) B_A^{-1/2}`` rescaled to RMS 0.2."""
    rows = captured(model, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    out = {}
    for i in (0, 2):
        w = model[i].weight
        m = (1 - mu) * w.grad + mu * (1 - mu) * w.grad
        a, gg = rows[i]
        fa = a.T @ a / a.shape[0]
        use_a, use_g = reference_sides(sides, *m.shape)
        ra = dense_power(fa, damping * float(torch.trace(fa)) / fa.shape[0], -0.5) if use_a else \
            torch.eye(m.shape[1], dtype=m.dtype)
        rg = torch.eye(m.shape[0], dtype=m.dtype)
        if use_g:
            fg = gg.T @ gg / gg.shape[0]
            rg = dense_power(fg, damping * float(torch.trace(fg)) / fg.shape[0], -0.5)
        o = rg @ newton_schulz(rg @ m @ ra, 5, dtype=torch.float64) @ ra
        o = o * UPDATE_RMS * math.sqrt(o.numel()) / o.norm()
        out[i] = w.detach() * (1 - lr * wd) - lr * o
    model.zero_grad()
    return out


@pytest.mark.parametrize("sides", ["input", "both", "smaller"])
@pytest.mark.parametrize("factors", ["ema", "rows"])
def test_spectral_step_matches_the_dense_reference(sides: str, factors: str) -> None:
    """Cholesky whitening (running factors) and the rows' symmetric root (``factors="rows"``) both give
    the symmetric-root direction: Newton–Schulz commutes with the orthogonal factor between them."""
    x, y = batch(n=5)
    model, ref_model = mlp(), mlp()
    want = reference_spectral(ref_model, x, y, lr=0.1, wd=0.3, damping=0.07, sides=sides)
    opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.3, direction="spectral", sides=sides,
                                      damping=0.07, factors=factors, ns_dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight.detach(), want[i], rtol=1e-9, atol=1e-11)
    assert "chol_a" in opt.state[model[0].weight] if factors == "ema" else True


@pytest.mark.parametrize("sides", ["input", "both"])
@pytest.mark.parametrize("p", [-1.0, -0.5, -0.25, "spectral"])  # recovery: Cholesky (−1, −1/2, spectral), eigh
def test_compact_state_takes_the_same_steps(sides: str, p: float | str) -> None:
    """``factor_every == eig_every`` keeps only the power (or Cholesky factor) per side (no factor, no
    eigensystem); its steps equal those of the full state with the same refreshes (decomposed every step)."""
    x, y = batch(n=12)
    params, states = [], []
    kind = "chol" if p == "spectral" else "power"
    args = {"direction": "spectral"} if p == "spectral" else {"power": p}
    for eig_every in (2, 1):
        model = mlp()
        opt = cgfac.optim.TransformerKFAC(model, lr=0.05, sides=sides, factor_every=2, eig_every=eig_every, **args)
        assert opt.compact == (eig_every == 2)
        for _ in range(5):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        params.append([q.detach().clone() for q in model.parameters()])
        states.append(opt.state[model[0].weight])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    kept = {k for k in states[0] if isinstance(states[0][k], torch.Tensor) and states[0][k].dim() == 2}
    want = {"momentum_buffer", f"{kind}_a"} | ({f"{kind}_g"} if sides == "both" else set())
    assert kept == want
    assert "factor_a" in states[1] and "eig_a" not in states[1]  # the full state: factor and power


def test_a_non_finite_gradient_skips_the_step() -> None:
    model = mlp()
    x, y = batch()
    opt = cgfac.optim.TransformerKFAC(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"rank": 0}, "rank"), ({"rank": 3, "direction": "spectral"}, "rank"), ({"rank": 3, "factors": "rows"}, "rank"),
    ({"direction": "newton"}, "direction"), ({"sides": "output"}, "sides"), ({"factors": "window"}, "factors"),
    ({"damping": 0.0}, "damping"), ({"power": 0.5}, "power"), ({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"rows": 0}, "rows"), ({"eig_every": 0}, "eig_every"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"direction": "ekfac", "factors": "rows"}, "factors"), ({"betas": (0.9, 1.5)}, "betas"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        cgfac.optim.TransformerKFAC(mlp(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        cgfac.optim.TransformerKFAC([nn.Linear(2, 2).weight])  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_routing_on_hugging_face_models(arch: str) -> None:
    """Attention and MLP projections (GPT-2's Conv1D included) take the Kronecker direction; the token
    embedding, the (tied) head, position tables and norms take AdamW; training lowers the loss."""
    pytest.importorskip("transformers")
    from hf_models import tiny_model, token_batches

    model = tiny_model(arch)
    opt = cgfac.optim.TransformerKFAC(model, lr=3e-3, sides="both", eig_every=2)
    kron = {n for n, r in opt.routes.items() if r == "kron"}
    if arch == "gpt2":
        want = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    else:
        want = {f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert kron == want
    assert set(opt.routes) == {n for n, p in model.named_parameters() if p.requires_grad}
    data = token_batches(8, 4)
    losses = []
    for b in data:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    conv = model.transformer.h[0].mlp.c_fc if arch == "gpt2" else model.model.layers[0].mlp.up_proj
    state = opt.state[conv.weight]
    d_in = 64
    assert state["factor_a"].shape == (d_in, d_in)  # Conv1D's weight (d_in × d_out) is used transposed


def test_ekfac_ortho_orthogonalises_the_ekfac_direction() -> None:
    """``"ekfac-ortho"``'s update is ``0.2·√max(d_out, d_in)·NS(O)`` with ``O`` the ``"ekfac"`` update."""
    x, y = batch(n=40)
    updates = {}
    for direction in ("ekfac", "ekfac-ortho"):
        model = mlp()
        opt = cgfac.optim.TransformerKFAC(model, lr=1.0, weight_decay=0.0, direction=direction, sides="both",
                                          ns_dtype=torch.float64)
        before = [model[i].weight.detach().clone() for i in (0, 2)]
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        updates[direction] = [b - model[i].weight.detach() for b, i in zip(before, (0, 2))]
    for o, got in zip(updates["ekfac"], updates["ekfac-ortho"]):
        want = newton_schulz(o, 5, dtype=torch.float64) * UPDATE_RMS * math.sqrt(max(o.shape))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_factors_refresh_every_factor_every_steps_from_those_steps_rows() -> None:
    """``factor_every=2``: the running factor after three steps is ``β_f A₁ + (1 − β_f) A₃`` (step 2's rows
    are not captured); ``rows=r`` samples ``r`` positions per forward."""
    model, ref = mlp(), mlp()
    opt = cgfac.optim.TransformerKFAC(model, lr=0.0, weight_decay=0.0, factor_every=2, factor_decay=0.7)
    seen = []
    for seed in (1, 2, 3):
        x, y = batch(n=6, seed=seed)
        seen.append(captured(ref, x, y)[2][0])
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    a1, a3 = (a.T @ a / a.shape[0] for a in (seen[0], seen[2]))
    torch.testing.assert_close(opt.state[model[2].weight]["factor_a"], 0.7 * a1 + 0.3 * a3, rtol=1e-12, atol=1e-14)
    sampled_model = mlp()
    sampled = cgfac.optim.TransformerKFAC(sampled_model, lr=0.0, rows=4)
    x, y = batch(n=10)
    nn.functional.cross_entropy(sampled_model(x), y).backward()
    sampled.step()
    assert int(torch.linalg.matrix_rank(sampled.state[sampled_model[2].weight]["factor_a"])) == 4  # 4 of 10 rows


def test_settings_changed_through_the_optimizer_reach_the_refresh() -> None:
    """``opt.damping = …`` (and the other factor settings) after construction: the next refresh uses
    the new value, as if the optimizer had been built with it."""
    x, y = batch(n=5)
    results = []
    for built, later in ((0.07, None), (0.5, 0.07)):
        model = mlp()
        opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.3, damping=built, eig_every=1,
                                          ns_dtype=torch.float64)
        if later is not None:
            opt.damping = later
            assert opt.refresher.settings.damping == later and opt.recorder.settings is opt.settings
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)




def wide_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 9, bias=False), nn.Tanh(), nn.Linear(9, 11), nn.Tanh(),
                         nn.Linear(11, 3)).double()


@pytest.mark.parametrize("sides", ["input", "both"])
def test_lowrank_steps_equal_the_dense_steps_while_the_rank_fits(sides: str) -> None:
    """``rank=8`` below every side's width (9–11) but above the factors' rank (3 steps of 2 rows):
    the low-rank running factors are exact, and three steps equal the dense optimizer's."""
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(2, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
            for _ in range(3)]
    params = []
    for rank in (None, 8):
        model = wide_mlp()
        opt = cgfac.optim.TransformerKFAC(model, lr=0.1, weight_decay=0.1, sides=sides, factor_every=1, eig_every=1,
                                          factor_decay=0.7, damping=0.05, rank=rank, ns_dtype=torch.float64)
        for x, y in data:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        if rank is not None:
            st = opt.state[model[0].weight]
            assert st["basis_a"].shape == (10, 6) and "power_a" not in st  # the low-rank state alone
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
