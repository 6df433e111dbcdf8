"""Public API: registration report, argument checks, hook lifetime, true Fisher."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgfac

BOTH = [cgfac.CGFAC, cgfac.KFAC]


def mixed_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(), nn.Linear(4 * 16, 8), nn.LayerNorm(8), nn.Linear(8, 3), nn.PReLU(),
    )


@pytest.mark.parametrize("cls", BOTH)
def test_registration_report_lists_every_trainable_module(cls, caplog) -> None:
    model = mixed_model()
    model[7].bias.requires_grad_(False)  # frozen bias: weight still covered
    with caplog.at_level(logging.INFO, logger="cgfac"):
        pre = cls(model, skip_layers=["9"])
    report = {e.name: e for e in pre.registration_report()}
    assert set(report) == {"0", "1", "3", "5", "7", "8", "9", "10"}
    assert [n for n, e in report.items() if e.covered] == ["0", "1", "3", "5", "7", "8"]
    assert "groups=2" in report["3"].reason and set(pre.layers) >= {"3:group0", "3:group1"}
    assert "feature-blocks" in report["1"].reason and "feature-blocks" in report["8"].reason
    assert "not a covered layer type" in report["10"].reason and "PReLU" in report["10"].reason
    assert report["9"].reason == "in skip_layers"
    assert pre.layers["7"].has_bias is False and pre.layers["7"].d_in == 64
    assert "keep their plain gradient" in caplog.text and "PReLU" in caplog.text
    assert "CGFAC registration" in caplog.text or "KFAC registration" in caplog.text


@pytest.mark.parametrize("cls", BOTH)
def test_uncovered_layers_keep_plain_gradient(cls) -> None:
    torch.manual_seed(0)
    model = mixed_model()
    pre = cls(model, kl_clip=None)
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    F.cross_entropy(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    covered = {e.name for e in pre.registration_report() if e.covered}
    for n, p in model.named_parameters():
        changed = not torch.equal(p.grad, plain[n])
        assert changed == (n.split(".")[0] in covered), n


def test_frozen_weight_and_skip_by_class() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    pre = cgfac.CGFAC(model, skip_layers=[nn.Conv2d])
    report = {e.name: e for e in pre.registration_report()}
    assert "0" not in report  # nothing trainable: left alone
    assert not report["1"].covered and "frozen" in report["1"].reason
    assert list(pre.layers) == ["2"]


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"damping": 0.0}, ValueError, "damping"),
    ({"damping": -1.0}, ValueError, "damping"),
    ({"damping": float("nan")}, ValueError, "damping"),
    ({"damping": "big"}, TypeError, "damping"),
    ({"kl_clip": 0.0}, ValueError, "kl_clip"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"loss_reduction": "avg"}, ValueError, "loss_reduction"),
    ({"fisher": "fake"}, ValueError, "fisher"),
    ({"skip_layers": [3]}, TypeError, "skip_layers"),
    ({"curvature": "diag"}, ValueError, "curvature"),
    ({"solver": "qr"}, ValueError, "solver"),
    ({"curvature": "exact", "solver": "eigen"}, ValueError, "solver"),
    ({"cg_max_iters": 0}, ValueError, "cg_max_iters"),
    ({"cg_max_iters": 2.5}, TypeError, "cg_max_iters"),
    ({"cg_tol": 0.0}, ValueError, "cg_tol"),
    ({"warm_start": 1}, TypeError, "warm_start"),
    ({"curvature_samples": 0}, ValueError, "curvature_samples"),
    ({"curvature_window": 0}, ValueError, "curvature_window"),
    ({"factor_decay": 1.5}, ValueError, "factor_decay"),
])
def test_bad_cgfac_arguments_name_the_argument(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        cgfac.CGFAC(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"factor_decay": -0.1}, ValueError, "factor_decay"),
    ({"factor_update_steps": 0}, ValueError, "factor_update_steps"),
    ({"inv_update_steps": 0}, ValueError, "inv_update_steps"),
])
def test_bad_kfac_arguments_name_the_argument(kwargs, exc, word) -> None:
    with pytest.raises(exc, match=word):
        cgfac.KFAC(nn.Linear(2, 2), **kwargs)


def test_model_without_layers_and_non_module() -> None:
    with pytest.raises(ValueError, match="model"):
        cgfac.CGFAC(nn.Sequential(nn.ReLU(), nn.PReLU()))
    with pytest.raises(TypeError, match="model"):
        cgfac.KFAC("not a model")


@pytest.mark.parametrize("cls", BOTH)
def test_callable_hyperparameter_checked_at_step(cls) -> None:
    model = nn.Linear(3, 2)
    pre = cls(model, damping=lambda step: 1e-2 if step == 0 else float("inf"))
    for step in range(2):
        model.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        if step == 0:
            pre.step()
            assert pre.layer_stats()[""]["damping"] == 1e-2
        else:
            with pytest.raises(ValueError, match="damping"):
                pre.step()


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


def test_cg_probe_is_bounded_and_falls_back_to_the_cheaper_method(monkeypatch) -> None:
    """Auto predicts lowrank; CG could win within 3 products, so it is probed with that budget.
    An ill-conditioned layer does not converge: lowrank solves the step, CG is marked as losing."""
    from cgfac.curvature.kron import KronRows
    from cgfac.solvers import cost

    monkeypatch.setattr(cost, "kron_costs", lambda r_a, r_g, d_in, d_out, k, c: {"cg": float(k), "lowrank": 3.5,
                                                                                 "eigen": 100.0})
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 20, dtype=torch.float64)
    g = torch.randn(12, 15, generator=gen, dtype=torch.float64)
    op, grad = KronRows(a, g), torch.randn(15, 20, generator=gen, dtype=torch.float64)
    pre = cgfac.CGFAC(nn.Linear(20, 15), cg_tol=1e-10)
    pre.solutions["w"] = torch.zeros_like(grad)
    pre.cost_constants = cost.CostConstants(1, 1, 1, 1, 0, 0)
    x = pre.solve_operator("w", op, grad, 1e-3)
    st = pre.layer_stats()["w"]
    assert st["method"] == "lowrank" and st["products"] == 3 and "not converged" in st["probe"]
    torch.testing.assert_close(x, op.solve_lowrank(grad, 1e-3))
    assert pre.last_iters["w"] == pre.cg_max_iters + 1
    pre.steps = 1  # no new probe before CG_PROBE_STEPS steps
    pre.stats.clear()  # as step() does
    pre.solve_operator("w", op, grad, 1e-3)
    assert pre.layer_stats()["w"]["method"] == "lowrank" and "probe" not in pre.layer_stats()["w"]
    # A well-conditioned layer converges within the budget: CG keeps the step.
    assert "w" not in pre.solutions  # no CG due next step: no warm start kept
    pre.steps = 1000
    pre.stats.clear()
    pre.solutions["w"] = torch.zeros_like(grad)  # kept by step 999, the step before a due probe
    easy = KronRows(torch.eye(20, dtype=torch.float64)[:12] * 1e-3, g * 1e-3)
    pre.solve_operator("w", easy, grad, 1.0)
    assert pre.layer_stats()["w"]["method"] == "cg" and pre.layer_stats()["w"]["converged"]


def test_cost_tie_goes_to_eigen_when_rows_outnumber_both_widths() -> None:
    """With r ≥ d on both sides the low-rank route is eigen plus arithmetic: equal costs, eigen."""
    from cgfac.solvers import cost

    c = cost.CostConstants(9.0, 4.0, 6.0, 1.1, 4e6, 8e6)
    for r_a, r_g, d_in, d_out in [(100352, 100352, 26, 16), (1000, 1000, 501, 1000)]:
        costs = cost.kron_costs(r_a, r_g, d_in, d_out, 10**6, c)
        assert costs["eigen"] == pytest.approx(costs["lowrank"], rel=1e-12)
        assert cost.choose(costs) == "eigen"
    assert cost.choose(cost.kron_costs(64, 64, 1000, 1000, 10**6, c)) == "lowrank"


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


def test_public_surface_is_re_exported() -> None:
    """The pieces a preconditioner strings together are reachable from the package root."""
    import cgfac.curvature
    import cgfac.precondition.state
    import cgfac.solvers

    assert cgfac.Solver is cgfac.solvers.Solver and cgfac.register_solver is cgfac.solvers.register_solver
    assert cgfac.LayerState is cgfac.precondition.state.LayerState
    assert cgfac.Curvature is cgfac.curvature.Curvature and cgfac.KronRows is cgfac.curvature.KronRows
    assert all(hasattr(cgfac, name) for name in cgfac.__all__)
