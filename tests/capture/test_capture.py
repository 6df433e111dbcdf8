"""The recorder (:mod:`cgfac.capture.capture`): hook lifetime, forwards without a backward, the true
Fisher's sampled rows, accumulated micro-batches, mixed precision, ``curvature_samples``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import capture, cases, covered, factors
from torch import nn

import cgfac


def test_remove_and_no_grad_capture_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = cgfac.CGFAC(model)
    with torch.no_grad():
        model(torch.randn(5, 3))
    model.eval()
    model(torch.randn(5, 3)).sum().backward()
    model.train()
    assert all(not h.chunks for h in pre.layers.values())
    with pre:
        model(torch.randn(5, 3))
        assert all(len(h.chunks) == 1 for h in pre.layers.values())
    assert all(not h.chunks for h in pre.layers.values())
    model(torch.randn(5, 3))
    assert all(not h.chunks for h in pre.layers.values())


def test_forward_without_backward_is_not_used() -> None:
    """An evaluation forward in train mode (no backward) leaves no stale rows in the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, x_eval = torch.randn(6, 3), torch.randn(9, 3)
    pre = cgfac.CGFAC(model, kl_clip=None, solver="lowrank")
    model(x).pow(2).mean().backward()
    model(x_eval)  # forward only
    pre.step()
    assert pre.layer_stats()["0"]["rows"] == 6


def test_true_fisher_samples_targets_and_leaves_grad_alone() -> None:
    """Cross-entropy: each sampled last-layer row is ``softmax(z) − e_ŷ``; ``.grad`` stays untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = cgfac.CGFAC(model, fisher="true")
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    out = model(x)
    pre.sample_fisher(out, "cross_entropy")
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(out, y).backward()
    rows = pre._rows(pre.layers["2"])
    onehot = torch.softmax(out.detach(), -1) - rows.g
    assert torch.allclose(onehot.sum(1), torch.ones(64), atol=1e-6)
    assert set(onehot.round().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(onehot, onehot.round(), atol=1e-6)
    # Sampled labels follow the model, not the data labels.
    assert not torch.equal(onehot.argmax(1), y)


@pytest.mark.parametrize("loss_type", ["gaussian", "bernoulli"])
def test_true_fisher_other_likelihoods(loss_type) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2000)
    pre = cgfac.KFAC(model, fisher="true")
    out = model(torch.randn(4, 3))
    pre.sample_fisher(out, loss_type)
    g = pre._rows(pre.layers[""]).g
    if loss_type == "gaussian":  # g = z − ŷ = −ε, ε ~ N(0, 1)
        assert abs(float(g.mean())) < 0.05 and abs(float(g.var()) - 1) < 0.05
    else:  # g = σ(z) − ŷ, ŷ ∈ {0, 1}
        y = torch.sigmoid(out.detach()) - g
        assert torch.allclose(y, y.round(), atol=1e-6)


def test_sample_fisher_needs_true_mode() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fisher"):
        cgfac.CGFAC(model).sample_fisher(model(torch.randn(1, 2)), "cross_entropy")
    with pytest.raises(ValueError, match="loss_type"):
        cgfac.CGFAC(model, fisher="true").sample_fisher(model(torch.randn(1, 2)), "poisson")


def test_true_fisher_rows_of_every_layer_equal_a_full_backward_of_the_sampled_loss() -> None:
    """The sampled backward asks only for the layers' output gradients (no weight gradients); each
    layer's g must still equal the per-sample output gradient of the sampled loss, computed here by
    an ordinary backward to every parameter with the sampled labels recovered from the last layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    pre = cgfac.KFAC(model, fisher="true")
    x = torch.randn(16, 4, dtype=torch.float64)
    out = model(x)
    pre.sample_fisher(out, "cross_entropy")
    assert not pre.capture.sample_targets  # nothing of the sampled forward is kept
    assert all(p.grad is None for p in model.parameters())
    rows = {name: pre._rows(pre.layers[name]) for name in ("0", "2", "4")}
    sampled = (torch.softmax(out.detach(), -1) - rows["4"].g).round().argmax(1)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            outputs[name] = output
        return hook

    hooks = [model[i].register_forward_hook(keep(str(i))) for i in (0, 2, 4)]
    F.cross_entropy(model(x), sampled, reduction="sum").backward()  # summed: per-sample gradients
    for h in hooks:
        h.remove()
    for name, r in rows.items():
        torch.testing.assert_close(r.g, outputs[name].grad, rtol=1e-12, atol=1e-14)


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


ACCUMULATING = {
    "cgfac-kron": lambda m: cgfac.CGFAC(m, kl_clip=None, solver="lowrank"),
    "cgfac-exact": lambda m: cgfac.CGFAC(m, curvature="exact", kl_clip=None, solver="lowrank"),
    "kfac": lambda m: cgfac.KFAC(m, kl_clip=None, factor_decay=0.0, inv_update_steps=1),
}


@pytest.mark.parametrize("kind", list(ACCUMULATING))
def test_gradient_accumulation_equals_one_big_batch(kind: str) -> None:
    """Micro-batches with ``loss / k`` before one ``step()`` = one backward over the whole batch."""
    x, y = batch(0, n=12)
    results = []
    for parts in (1, 3):
        torch.manual_seed(0)
        model = net().double()
        pre = ACCUMULATING[kind](model)
        for xs, ys in zip(x.double().chunk(parts), y.chunk(parts)):
            F.cross_entropy(model(xs), ys).div(parts).backward()
        pre.step()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_true_fisher_accumulation_gives_per_sample_rows() -> None:
    """Sampled micro-batches: every last-layer row is ``softmax(z) − e_ŷ`` (no 1/k, no 1/n left)."""
    torch.manual_seed(0)
    model = net()
    pre = cgfac.CGFAC(model, fisher="true")
    x, y = batch(0, n=12)
    probs = []
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        out = model(xs)
        pre.sample_fisher(out, "cross_entropy")
        probs.append(torch.softmax(out.detach(), -1))
        F.cross_entropy(out, ys).div(3).backward()
    rows = pre._rows(pre.layers["6"])
    onehot = torch.cat(probs) - rows.g
    assert rows.n == 12 and torch.allclose(onehot, onehot.round(), atol=1e-6)
    assert torch.allclose(onehot.sum(1), torch.ones(12), atol=1e-6)


@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_autocast_bfloat16_direction_close_to_float32(cls) -> None:
    directions = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = net()
        pre = cls(model, kl_clip=None, damping=1e-1)
        x, y = batch(0, n=32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        assert all(c.get("method") for c in pre.layer_stats().values())
        directions.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    ref, got = directions
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_grad_scaler_is_accounted_for() -> None:
    """``scaler.scale(loss).backward(); scaler.unscale_(opt); pre.step()`` = the unscaled step."""
    out = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        pre = cgfac.CGFAC(model, grad_scaler=scaler, solver="lowrank")
        x, y = batch(0)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        pre.step()
        out.append([p.grad.clone() for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("cls", [cgfac.CGFAC, cgfac.KFAC])
def test_train_eval_train_uses_no_stale_rows(cls) -> None:
    """Evaluating under ``no_grad`` (train or eval mode) between steps changes nothing."""
    grads = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        model = net()
        pre = cls(model, **({"inv_update_steps": 1} if cls is cgfac.KFAC else {}))
        for step in range(2):
            if evaluate:
                with torch.no_grad():
                    model(batch(50 + step, n=5)[0])
                model.eval()
                with torch.no_grad():
                    model(batch(60 + step, n=7)[0])
                model.train()
            one_backward(model, step)
            pre.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


CASES = {c.name: c for c in cases()}
DAMPING = 0.05


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
