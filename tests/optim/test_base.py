"""cgfac.optim against dense float64 references: the output Hessians, the exact-GGN Gram of the
quadratic model, the (α, μ) solve, ρ and q(δ), the Levenberg–Marquardt rule, checkpoints and
schedulers, the true Fisher, BatchNorm buffers and Dropout masks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import cgfac
from cgfac.optim import output_quad_form

N, D_IN, HIDDEN, K = 24, 4, 5, 3


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default for this module's tests only (a module-level switch leaked into every test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_data(loss_type: str, seed: int = 0, n: int = N) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen)
    if loss_type == "cross_entropy":
        y = torch.randint(0, K, (n,), generator=gen)
    elif loss_type == "bernoulli":
        y = (torch.rand(n, K, generator=gen) > 0.5).double()
    else:
        y = torch.randn(n, K, generator=gen)
    return x, y


def loss_fn(loss_type: str):
    """The loss conventions of cgfac.optim's module docstring."""
    if loss_type == "cross_entropy":
        return lambda z, y: F.cross_entropy(z, y)
    if loss_type == "bernoulli":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1).mean()
    return lambda z, y: 0.5 * (z - y).pow(2).sum(-1).mean()


def mlp(seed: int = 0, *extra: nn.Module) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), *extra, nn.Tanh(), nn.Linear(HIDDEN, K)).double()


def flat(model: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([tensors[n].reshape(-1) for n, _ in model.named_parameters()])


def theta(model: nn.Module) -> Tensor:
    return flat(model, {n: p.detach() for n, p in model.named_parameters()}).clone()


def bare(model: nn.Module) -> nn.Module:
    """A copy of the model without any hook (no capture by the preconditioner or the optimizer)."""
    clone = copy.deepcopy(model)
    for m in clone.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        m._backward_hooks.clear()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # batch statistics, no running-stat update
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return clone


def functional(model: nn.Module, x: Tensor):
    """``θ ↦ outputs`` on a copy of the buffers (nothing of the model is changed)."""
    model = bare(model)
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(t: Tensor) -> Tensor:
        params, i = {}, 0
        for n, shape, size in shapes:
            params[n] = t[i:i + size].view(shape)
            i += size
        return functional_call(model, {**params, **buffers}, (x,))
    return f


def dense_quantities(model: nn.Module, x: Tensor, y: Tensor, loss_type: str, wd: float = 0.0,
                     seed: int | None = None) -> tuple[Tensor, Tensor, float]:
    """The GGN ``C = Jᵀ H J`` over the flattened parameters, ``∇h`` and ``h`` (with ``½ wd ‖θ‖²``);
    ``seed`` replays a dropout mask (the RNG is seeded before each pass)."""
    f, t = functional(model, x), theta(model)
    loss = loss_fn(loss_type)

    def seeded():
        if seed is not None:
            torch.manual_seed(seed)
    seeded()
    z = f(t).detach()
    seeded()
    jac = jacrev(f)(t).reshape(z.numel(), -1)
    hess = torch.autograd.functional.hessian(lambda out: loss(out, y), z).reshape(z.numel(), z.numel())
    seeded()
    tt = t.clone().requires_grad_(True)
    h = loss(f(tt), y) + 0.5 * wd * tt.pow(2).sum()
    (grad,) = torch.autograd.grad(h, tt)
    return jac.T @ hess @ jac, grad, float(h.detach())


def closure_for(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, loss_type: str,
                seed: int | None = None):
    loss = loss_fn(loss_type)

    def closure():
        opt.zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        out = loss(model(x), y)
        out.backward()
        return out
    return closure


def capture_gram(opt) -> dict:
    """Record the vectors and the Gram of the optimizer's quadratic model."""
    seen: dict = {}
    original = opt._curvature_gram

    def wrapped(vectors):
        gram = original(vectors)
        seen.update(vectors=vectors, gram=gram.clone())
        return gram
    opt._curvature_gram = wrapped
    return seen


def kfac_opt(model: nn.Module, **kwargs):
    kwargs.setdefault("damping", 0.1)
    kwargs.setdefault("factor_decay", 0.0)
    kwargs.setdefault("inv_update_steps", 1)
    return cgfac.optim.KFAC(model, **kwargs)


# --- the output Hessians -----------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["cross_entropy", "bernoulli", "gaussian", "mse"])
def test_output_quad_form_is_the_loss_hessian(loss_type):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, K, generator=gen) * 2
    u, w = torch.randn(6, K, generator=gen), torch.randn(6, K, generator=gen)
    _, y = make_data(loss_type if loss_type != "mse" else "gaussian", n=6)
    hess = torch.autograd.functional.hessian(lambda out: loss_fn(loss_type)(out, y), z).reshape(6 * K, 6 * K)
    expected = u.reshape(-1) @ hess @ w.reshape(-1)
    got = output_quad_form(z, u, w, loss_type)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(output_quad_form(z, w, u, loss_type), got, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="loss_type"):
        output_quad_form(z, u, w, "poisson")


# --- the quadratic model: Gram, (α, μ), update, q, ρ, damping ----------------------------------
@pytest.mark.parametrize("loss_type,adaptive,wd,lr", [
    ("cross_entropy", "lr+momentum", 0.0, 1.0),
    ("bernoulli", "lr+momentum", 0.05, 1.0),
    ("gaussian", "lr+momentum", 0.0, 0.7),
    ("cross_entropy", "lr", 0.05, 1.0),
])
def test_step_equals_dense_quadratic_model(loss_type, adaptive, wd, lr):
    model = mlp()
    x, y = make_data(loss_type)
    opt = kfac_opt(model, loss_type=loss_type, adaptive=adaptive, weight_decay=wd, lr=lr, momentum=0.6,
                   damping_interval=1, damping_decay=0.9)
    closure = closure_for(model, opt, x, y, loss_type)
    opt.step(closure)
    seen = capture_gram(opt)
    lam = opt.damping
    t0 = theta(model)
    prev = flat(model, {n: opt.state[p]["prev_update"] for n, p in model.named_parameters()})
    c, grad, h0 = dense_quantities(model, x, y, loss_type, wd)
    opt.step(closure)
    t1 = theta(model)
    _, _, h1 = dense_quantities(model, x, y, loss_type, wd)

    delta = flat(model, seen["vectors"][0])
    torch.testing.assert_close(flat(model, seen["vectors"][1]), prev, rtol=0, atol=0)
    basis = torch.stack([delta, prev], dim=1)
    # The Gram of the exact GGN.
    torch.testing.assert_close(seen["gram"], basis.T @ c @ basis, rtol=1e-10, atol=1e-13)
    # (α, μ): the dense minimiser of M(δ) = ∇hᵀδ + ½ δᵀ(C + (λ + wd) I)δ over the span (μ fixed with "lr").
    damped = c + (lam + wd) * torch.eye(c.shape[0])
    if adaptive == "lr+momentum":
        alpha, mu = (-torch.linalg.solve(basis.T @ damped @ basis, basis.T @ grad)).tolist()
    else:
        mu = 0.6
        alpha = float(-(delta @ grad + mu * delta @ damped @ prev) / (delta @ damped @ delta))
    assert opt.last["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert opt.last["mu"] == pytest.approx(mu, rel=1e-9, abs=1e-12)
    # The update applied.
    step = t1 - t0
    torch.testing.assert_close(step, lr * alpha * delta + mu * prev, rtol=1e-9, atol=1e-12)
    # q(δ) without damping, and ρ.
    q = float(grad @ step + 0.5 * step @ (c + wd * torch.eye(c.shape[0])) @ step)
    assert opt.last["quad_change"] == pytest.approx(q, rel=1e-9)
    assert q < 0
    assert opt.last["rho"] == pytest.approx((h1 - h0) / q, rel=1e-8)
    # The Levenberg–Marquardt rule with ω = 0.9.
    rho = opt.last["rho"]
    expected = lam / 0.9 if rho < 0.25 else lam * 0.9 if rho > 0.75 else lam
    assert opt.damping == pytest.approx(expected, rel=1e-14)
    # After the step .grad holds ∇h at θ (the closure's evaluation at the new point is discarded).
    torch.testing.assert_close(flat(model, {n: p.grad for n, p in model.named_parameters()}), grad,
                               rtol=1e-10, atol=1e-13)


def test_relative_damping_in_the_direction_and_the_quadratic_model():
    """``damping_scale="relative"``: layer ``l`` is solved with ``λ s_l + wd``, ``s_l = tr(A)tr(G)/(d_in d_out)``,
    and the 2×2 model damps each layer's block by the same amount."""
    model = mlp()
    x, y = make_data("cross_entropy")
    wd = 0.05
    opt = kfac_opt(model, loss_type="cross_entropy", weight_decay=wd, damping=0.3, damping_scale="relative",
                   adapt_damping=False)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    opt.step(closure)
    seen = capture_gram(opt)
    lam = opt.damping
    prev = flat(model, {n: opt.state[p]["prev_update"] for n, p in model.named_parameters()})
    c, grad, _ = dense_quantities(model, x, y, "cross_entropy", wd)
    opt.step(closure)
    pre = opt.preconditioner
    per_param = {}
    for name in ("0", "2"):
        a_f, g_f = pre.factors[name]
        scale = float(torch.trace(a_f) * torch.trace(g_f)) / (a_f.shape[0] * g_f.shape[0])
        assert pre.layer_stats()[name]["curvature_scale"] == pytest.approx(scale, rel=1e-12)
        assert pre.layer_stats()[name]["damping"] == pytest.approx(lam * scale + wd, rel=1e-12)
        for pname in ("weight", "bias"):
            per_param[f"{name}.{pname}"] = torch.full_like(dict(model.named_parameters())[f"{name}.{pname}"],
                                                           lam * scale + wd)
        # The layer's direction: the dense damped Kronecker solve at its own damping.
        w_grad = torch.cat([model[int(name)].weight.grad, model[int(name)].bias.grad[:, None]], dim=1)
        system = torch.kron(a_f, g_f) + (lam * scale + wd) * torch.eye(a_f.shape[0] * g_f.shape[0],
                                                                         dtype=torch.float64)
        want = -unvec_(torch.linalg.solve(system, w_grad.T.reshape(-1)), w_grad.shape)
        got = seen["vectors"][0]
        got_m = torch.cat([got[f"{name}.weight"], got[f"{name}.bias"][:, None]], dim=1)
        torch.testing.assert_close(got_m, want, rtol=1e-9, atol=1e-12)
    damping = torch.diag(flat(model, per_param))
    delta = flat(model, seen["vectors"][0])
    basis = torch.stack([delta, prev], dim=1)
    alpha, mu = (-torch.linalg.solve(basis.T @ (c + damping) @ basis, basis.T @ grad)).tolist()
    assert opt.last["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert opt.last["mu"] == pytest.approx(mu, rel=1e-9, abs=1e-12)
    # Absolute damping would have chosen differently (the scales are far from 1 here).
    plain = c + (lam + wd) * torch.eye(c.shape[0], dtype=torch.float64)
    assert (-torch.linalg.solve(basis.T @ plain @ basis, basis.T @ grad))[0] != pytest.approx(alpha, rel=1e-3)


def unvec_(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    return v.reshape(shape[1], shape[0]).T


def test_first_step_uses_delta_only():
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = kfac_opt(model, loss_type="cross_entropy", adapt_damping=False)
    seen = capture_gram(opt)
    c, grad, _ = dense_quantities(model, x, y, "cross_entropy")
    t0 = theta(model)
    opt.step(closure_for(model, opt, x, y, "cross_entropy"))
    assert len(seen["vectors"]) == 1
    delta = flat(model, seen["vectors"][0])
    alpha = float(-(delta @ grad) / (delta @ (c + 0.1 * torch.eye(c.shape[0])) @ delta))
    assert opt.last["alpha"] == pytest.approx(alpha, rel=1e-9)
    torch.testing.assert_close(theta(model) - t0, alpha * delta, rtol=1e-9, atol=1e-12)


def test_adaptive_none_is_sgd_momentum_on_the_direction():
    model = mlp()
    x, y = make_data("gaussian")
    opt = kfac_opt(model, adaptive="none", adapt_damping=False, lr=0.3, momentum=0.5)
    ref = cgfac.KFAC(mlp(), damping=0.1, factor_decay=0.0, inv_update_steps=1, kl_clip=None)
    ref_model = ref.model
    prev = None
    for _ in range(3):
        ref_model.zero_grad()
        loss_fn("gaussian")(ref_model(x), y).backward()
        ref.step()
        direction = -torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
        t0 = theta(model)
        opt.zero_grad()
        loss_fn("gaussian")(model(x), y).backward()  # no closure needed without adaptive damping
        opt.step()
        expected = 0.3 * direction + (0.5 * prev if prev is not None else 0)
        torch.testing.assert_close(theta(model) - t0, expected, rtol=1e-10, atol=1e-13)
        prev = expected
        with torch.no_grad():
            for p, q in zip(ref_model.parameters(), model.parameters()):
                p.copy_(q)


def test_bad_step_raises_damping_good_step_lowers_it():
    # Linear model, Gaussian loss: the quadratic model is exact, ρ = 1 (good step).
    torch.manual_seed(0)
    model = nn.Linear(D_IN, K).double()
    x, y = make_data("gaussian")
    opt = kfac_opt(model, loss_type="gaussian", damping=1.0, damping_interval=1, damping_decay=0.8,
                   min_damping=0.6)
    closure = closure_for(model, opt, x, y, "gaussian")
    opt.step(closure)
    assert opt.last["rho"] == pytest.approx(1.0, abs=1e-9)
    assert opt.damping == pytest.approx(0.8)
    opt.step(closure)
    assert opt.damping == pytest.approx(0.64)
    opt.step(closure)
    assert opt.damping == 0.6  # clamped at min_damping
    # A step 50 times too long: the loss goes up (ρ < 0), λ is raised by 1/ω, clamped at max_damping.
    model = mlp()
    opt = kfac_opt(model, loss_type="cross_entropy", lr=50.0, damping=1.0, damping_interval=1,
                   damping_decay=0.8, max_damping=1.5, adaptive="lr")
    x, y = make_data("cross_entropy")
    closure = closure_for(model, opt, x, y, "cross_entropy")
    loss0 = float(closure().detach())
    t0 = theta(model)
    opt.step(closure)
    assert opt.last["new_loss"] > loss0
    assert opt.last["rho"] < 0
    assert opt.damping == pytest.approx(1.0 / 0.8)
    # The loss rose on the update's own batch: the update is undone (reject_worse) with its momentum.
    assert opt.last["rejected"] == 1.0 and opt.rejected_steps == 1
    torch.testing.assert_close(theta(model), t0, rtol=0, atol=1e-15)
    assert all("prev_update" not in opt.state[p] for p in model.parameters())
    opt.step(closure)
    assert opt.damping == 1.5
    # reject_worse=False keeps a rising update.
    model = mlp()
    opt = kfac_opt(model, loss_type="cross_entropy", lr=50.0, damping=1.0, damping_interval=1, adaptive="lr",
                   reject_worse=False)
    t0 = theta(model)
    opt.step(closure_for(model, opt, x, y, "cross_entropy"))
    assert opt.last["rho"] < 0 and opt.last["rejected"] == 0.0 and opt.rejected_steps == 0
    assert not torch.allclose(theta(model), t0)


def test_damping_adapted_every_interval_only():
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = kfac_opt(model, loss_type="cross_entropy", damping_interval=3, damping_decay=0.9)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    calls = []
    counted = lambda: calls.append(1) or closure()  # noqa: E731
    for step in range(1, 7):
        before = opt.damping
        opt.step(counted)
        adapted = step % 3 == 0
        assert ("rho" in opt.last) == adapted
        assert len(calls) == step + sum(1 for s in range(1, step + 1) if s % 3 == 0)
        if not adapted:
            assert opt.damping == before
        else:
            rho = opt.last["rho"]
            omega = 0.9**3
            expected = before / omega if rho < 0.25 else before * omega if rho > 0.75 else before
            assert opt.damping == pytest.approx(expected, rel=1e-14)


def test_non_finite_loss_undoes_the_update():
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = kfac_opt(model, loss_type="cross_entropy", damping_interval=1, damping_decay=0.9)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    opt.step(closure)
    calls = []

    def poisoned():
        calls.append(1)
        loss = closure()
        return loss * math.inf if len(calls) == 2 else loss  # the loss at the new point is infinite
    t0, lam = theta(model), opt.damping
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(poisoned)
    torch.testing.assert_close(theta(model), t0, rtol=0, atol=1e-15)
    assert opt.damping == pytest.approx(lam / 0.9)
    assert all("prev_update" not in opt.state[p] for p in model.parameters())
    opt.step(closure)  # recovers: a step without momentum
    assert opt.last["mu"] == 0.0
    assert math.isfinite(opt.last["rho"])


# --- errors ------------------------------------------------------------------------------------
def test_errors():
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = kfac_opt(model, loss_type="cross_entropy")
    opt.zero_grad()
    loss_fn("cross_entropy")(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    opt.remove()
    with pytest.raises(ValueError, match="loss_type"):
        kfac_opt(mlp())
    with pytest.raises(ValueError, match="adaptive"):
        kfac_opt(mlp(), loss_type="cross_entropy", adaptive="momentum")
    with pytest.raises(ValueError, match="damping"):
        cgfac.optim.KFAC(mlp(), loss_type="cross_entropy", damping=lambda s: 0.1)
    with pytest.raises(ValueError, match="kl_clip"):
        kfac_opt(mlp(), loss_type="cross_entropy", kl_clip=1e-3)
    with pytest.raises(ValueError, match="loss_type"):
        kfac_opt(mlp(), adaptive="none", adapt_damping=False, fisher="true")
    with pytest.raises(ValueError, match="adapt_damping"):
        kfac_opt(mlp(), adaptive="none")


# --- checkpoints and schedulers ------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda m: kfac_opt(m, loss_type="cross_entropy", damping_interval=2, inv_update_steps=2, factor_decay=0.5,
                       momentum=0.3),
    lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", damping=0.1, solver="cg", damping_interval=2),
    # the model on a schedule (evaluated on steps 0, 1, 3, 7): steps 2, 4 and 5 reuse saved coefficients
    lambda m: kfac_opt(m, loss_type="cross_entropy", adapt_damping=False, quad_every=4, quad_tol=10.0),
], ids=["kfac", "cgfac-cg", "kfac-quad-every"])
def test_state_dict_round_trip(make):
    x, y = make_data("cross_entropy")
    model = mlp()
    opt = make(model)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    for _ in range(3):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    other = mlp(seed=5)
    other.load_state_dict(saved["model"])
    opt2 = make(other)
    opt2.load_state_dict(saved["opt"])
    assert opt2.damping == opt.damping and opt2.steps == opt.steps
    assert opt2.schedule == opt.schedule
    closure2 = closure_for(other, opt2, x, y, "cross_entropy")
    for _ in range(3):
        opt.step(closure)
        opt2.step(closure2)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert opt2.damping == opt.damping
    with pytest.raises(ValueError, match="cgfac"):
        opt2.load_state_dict(torch.optim.SGD(other.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_scheduler_scales_the_step(kind):
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = kfac_opt(model, loss_type="cross_entropy", adapt_damping=False, lr=0.8)
    if kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    closure = closure_for(model, opt, x, y, "cross_entropy")
    for i in range(3):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.8 * (0.5**i if kind == "step" else 1.0 / (1 + i)))
        seen = capture_gram(opt)
        t0 = theta(model)
        prev = [opt.state[p].get("prev_update") for p in model.parameters()]
        opt.step(closure)
        expected = lr * opt.last["alpha"] * flat(model, seen["vectors"][0])
        if i > 0:
            expected = expected + opt.last["mu"] * torch.cat([v.reshape(-1) for v in prev])
        torch.testing.assert_close(theta(model) - t0, expected, rtol=1e-10, atol=1e-13)
        sched.step()


# --- true Fisher, exact and CG curvature ---------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda m: kfac_opt(m, loss_type="cross_entropy", fisher="true"),
    lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", damping=0.1, curvature="exact"),
    lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", damping=0.1, curvature="kron", solver="cg"),
], ids=["kfac-true-fisher", "cgfac-exact", "cgfac-kron-cg"])
def test_optimizers_train(make):
    model = mlp()
    x, y = make_data("cross_entropy")
    opt = make(model)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    first = float(closure().detach())
    seen = capture_gram(opt)
    for _ in range(4):
        opt.step(closure)
        assert math.isfinite(opt.last["alpha"]) and opt.last["alpha"] > 0
    assert float(closure().detach()) < first
    stats = opt.preconditioner.layer_stats()
    assert set(stats) == {"0", "2"} and all("fallback" not in s for s in stats.values())
    assert opt.skipped_steps == 0 and opt.preconditioner.fallbacks == 0
    assert seen["gram"].shape == (2, 2)
    if opt.preconditioner.fisher == "true":
        assert opt.preconditioner.capture.generators  # targets were sampled in the root forward hook


def test_true_fisher_factors_from_sampled_targets():
    """The G factor of fisher='true' through the optimizer is the sampled one, not the empirical one."""
    x, y = make_data("cross_entropy")
    emp_model, true_model = mlp(), mlp()
    emp = kfac_opt(emp_model, loss_type="cross_entropy", adapt_damping=False)
    true = kfac_opt(true_model, loss_type="cross_entropy", adapt_damping=False, fisher="true")
    emp.step(closure_for(emp_model, emp, x, y, "cross_entropy"))
    true.step(closure_for(true_model, true, x, y, "cross_entropy"))
    a_e, g_e = emp.preconditioner.factors["2"]
    a_t, g_t = true.preconditioner.factors["2"]
    torch.testing.assert_close(a_e, a_t, rtol=0, atol=0)
    assert not torch.allclose(g_e, g_t)


# --- BatchNorm and Dropout ----------------------------------------------------------------------
def test_batchnorm_buffers_untouched_by_the_optimizer():
    x, y = make_data("cross_entropy")
    model = mlp(0, nn.BatchNorm1d(HIDDEN))
    ref = mlp(0, nn.BatchNorm1d(HIDDEN))
    opt = kfac_opt(model, loss_type="cross_entropy", damping_interval=1)
    closure = closure_for(model, opt, x, y, "cross_entropy")
    seen = capture_gram(opt)
    for _ in range(2):
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters()):
                p.copy_(q)
        loss_fn("cross_entropy")(ref(x), y)  # one training forward: what the running stats should see
        opt.step(closure)
        for (name, b), rb in zip(model.named_buffers(), ref.buffers()):
            assert torch.equal(b, rb), name
    # The Gram is the dense GGN of the batch-statistics forward (at the parameters of that step).
    assert seen["gram"].shape == (2, 2)


def test_batchnorm_gram_matches_dense():
    x, y = make_data("cross_entropy")
    model = mlp(0, nn.BatchNorm1d(HIDDEN))
    opt = kfac_opt(model, loss_type="cross_entropy", adapt_damping=False)
    seen = capture_gram(opt)
    c, _, _ = dense_quantities(model, x, y, "cross_entropy")
    opt.step(closure_for(model, opt, x, y, "cross_entropy"))
    delta = flat(model, seen["vectors"][0])
    assert float(seen["gram"][0, 0]) == pytest.approx(float(delta @ c @ delta), rel=1e-10)


def test_dropout_gram_replays_the_mask():
    x, y = make_data("cross_entropy")
    runs = []
    for _ in range(2):
        model = mlp(0, nn.Dropout(0.5))
        opt = kfac_opt(model, loss_type="cross_entropy", adapt_damping=False)
        seen = capture_gram(opt)
        c, _, _ = dense_quantities(model, x, y, "cross_entropy", seed=123)
        torch.manual_seed(7)  # the RNG the optimizer's forward-mode pass must not depend on
        opt.step(closure_for(model, opt, x, y, "cross_entropy", seed=123))
        delta = flat(model, seen["vectors"][0])
        assert float(seen["gram"][0, 0]) == pytest.approx(float(delta @ c @ delta), rel=1e-10)
        runs.append((opt.last["alpha"], float(torch.rand(1))))
    assert runs[0] == runs[1]  # α identical, and the caller's RNG stream continues as without the pass


def test_adaptive_step_through_multihead_attention() -> None:
    """nn.MultiheadAttention's fused CPU kernel has no forward-mode AD; the GGN passes use the
    math kernel, which equals it: the Gram of a tiny transformer matches a dense reference."""
    from cgfac_bench.models import transformer_lm

    torch.manual_seed(0)
    model = transformer_lm(vocab=11, context=6, width=8, depth=1, heads=2).double()
    x = torch.randint(0, 11, (3, 6))
    y = torch.randint(0, 11, (3, 6))
    opt = cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=0.1, adapt_damping=False)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)
    delta = {n: params[n].detach() - before[n] for n in params}  # the first step: lr·α·Δ
    alpha = opt.last["alpha"]
    assert math.isfinite(alpha) and alpha > 0
    # Dense check of Δᵀ C Δ = (JΔ)ᵀ H (JΔ) / rows with J by jacrev at the old parameters.
    flat = {n: before[n] for n in params}

    def out_fn(ps):
        return functional_call(model, ps, (x,)).reshape(-1, 11)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        jac = jacrev(out_fn)(flat)
    direction = {n: delta[n] / alpha for n in params}
    jd = sum((jac[n] * direction[n]).flatten(2).sum(-1) for n in params)
    z = out_fn(flat).detach()
    expected = output_quad_form(z, jd, jd, "cross_entropy")
    assert float(expected) == pytest.approx(opt.last["dir_curvature"], rel=1e-8)


@pytest.mark.parametrize("loss_type", ["cross_entropy", "gaussian"])
def test_quad_samples_are_the_last_entries_apart_from_the_curvature_rows(loss_type):
    """``quad_samples=k``: the Gram is the dense GGN of the batch's *last* k samples (the
    curvature's ``curvature_samples`` rows are its first entries), so the model measures the
    direction on samples its curvature never saw."""
    x, y = make_data(loss_type)
    k = 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 40), nn.Tanh(), nn.Linear(40, K)).double()
    opt = cgfac.optim.CGFAC(model, loss_type=loss_type, damping=0.1, adapt_damping=False,
                            curvature_samples=8, curvature_window=1, solver="lowrank", quad_samples=k)
    seen = capture_gram(opt)
    c_last, _, _ = dense_quantities(model, x[-k:], y[-k:], loss_type)
    c_first, _, _ = dense_quantities(model, x[:k], y[:k], loss_type)
    opt.step(closure_for(model, opt, x, y, loss_type))
    delta = flat(model, seen["vectors"][0])
    assert float(seen["gram"][0, 0]) == pytest.approx(float(delta @ c_last @ delta), rel=1e-10)
    assert float(seen["gram"][0, 0]) != pytest.approx(float(delta @ c_first @ delta), rel=1e-3)


def test_few_curvature_rows_and_a_small_quadratic_model_do_not_diverge():
    """A 300-wide layer, 16 curvature rows, the model on 16 samples: measured on the curvature's
    own samples the model saw no curvature along the direction's largest components and its
    step blew the loss up (27 → 2·10⁷ in five steps); measured on other samples it trains."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 300), nn.Tanh(), nn.Linear(300, 50))
    opt = cgfac.optim.CGFAC.wide(model, loss_type="gaussian", curvature_samples=16, quad_samples=16)
    x = torch.randn(64, 50)
    closure = closure_for(model, opt, x, x, "gaussian")
    first = float(closure())
    for _ in range(5):
        opt.step(closure)
    assert float(closure()) < 0.5 * first
