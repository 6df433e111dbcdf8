"""The layer-helper registry: user-defined modules, most-derived match, per-preconditioner
overrides, reasons for uncovered modules, and the package's re-exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_reference import EXACT_KINDS, KRON_KINDS, PRECONDITIONERS
from torch import nn

import cgfac
from cgfac.layers import LinearHelper, find_factory, linear_helper


class MyLinear(nn.Module):
    """A user-defined layer: its own parameters, ``F.linear`` in forward."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MyLinearChild(MyLinear):
    pass


def pair(make_first):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    mine = nn.Sequential(make_first(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        mine[0].weight.copy_(ref[0].weight)
        mine[0].bias.copy_(ref[0].bias)
        mine[2].load_state_dict(ref[2].state_dict())
    return ref, mine


def directions(kind, model, x, y):
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    return pre, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_registered_user_module_matches_linear(kind, clean_registry) -> None:
    cgfac.register_layer_helper(MyLinear, linear_helper)
    ref, mine = pair(MyLinear)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    _, want = directions(kind, ref, x, y)
    pre, got = directions(kind, mine, x, y)
    assert isinstance(pre.layers["0"], LinearHelper)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class MyScaledLinear(MyLinear):
    """Not ``F.linear`` on its own parameters: the probe does not cover it."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight.tanh(), self.bias)


def test_unregistered_user_module_is_probed_or_reported() -> None:
    _, mine = pair(MyLinear)
    report = {e.name: e for e in cgfac.KFAC(mine).registration_report()}
    assert report["0"].covered and report["0"].rule.startswith("probe:linear")
    report = {e.name: e for e in cgfac.KFAC(mine, probe_layers=False).registration_report()}
    assert not report["0"].covered and "MyLinear is not a covered layer type" in report["0"].reason
    _, scaled = pair(MyScaledLinear)
    report = {e.name: e for e in cgfac.KFAC(scaled).registration_report()}
    assert not report["0"].covered and "MyScaledLinear is not a covered layer type (probe" in report["0"].reason
    assert report["2"].rule == "registered:Linear"
    with pytest.raises(TypeError, match="probe_layers"):
        cgfac.KFAC(mine, probe_layers="yes")


def test_most_derived_registration_wins(clean_registry) -> None:
    cgfac.register_layer_helper(MyLinear, linear_helper)
    assert find_factory(MyLinearChild) is linear_helper  # a subclass inherits its base's helper
    cgfac.register_layer_helper(MyLinearChild, lambda name, m: "child: not covered on purpose")
    assert find_factory(MyLinear) is linear_helper
    report = {e.name: e for e in cgfac.CGFAC(nn.Sequential(MyLinearChild(3, 2), MyLinear(2, 2)))
              .registration_report()}
    assert report["0"].reason == "child: not covered on purpose" and report["1"].covered


def test_per_preconditioner_override() -> None:
    _, mine = pair(MyLinear)
    pre = cgfac.CGFAC(mine, layer_helpers={MyLinear: linear_helper})
    assert set(pre.layers) == {"0", "2"}
    assert {e.name: e.rule for e in pre.registration_report()}["0"] == "layer_helpers[MyLinear]"
    assert set(cgfac.CGFAC(mine, probe_layers=False).layers) == {"2"}  # the global registry is untouched
    pre = cgfac.KFAC(mine, layer_helpers={nn.Linear: lambda name, m: "overridden", MyLinear: linear_helper})
    report = {e.name: e for e in pre.registration_report() if e.name == "2"}
    assert report["2"].reason == "overridden" and not report["2"].covered
    with pytest.raises(TypeError, match="layer_helpers"):
        cgfac.CGFAC(mine, layer_helpers=[(MyLinear, linear_helper)])
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        cgfac.register_layer_helper(int, linear_helper)


def test_everything_else_keeps_plain_gradient_and_is_reported() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Unflatten(1, (4, 1)), nn.ConvTranspose1d(4, 2, 1),
                          nn.Flatten(), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    pre = cgfac.CGFAC(model, kl_clip=None)
    report = {e.name: e for e in pre.registration_report()}
    assert not report["0"].covered and "frozen" in report["0"].reason
    assert "PReLU is not a covered layer type" in report["1"].reason
    assert "transposed" in report["3"].reason
    assert set(pre.layers) == {"5"}
    F.cross_entropy(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    pre.step()
    for n, g in plain.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g) == (not n.startswith("5.")), n


def test_public_surface() -> None:
    from cgfac.layers import Chunk, Conv2dHelper, LayerHelper, Rows, make_helper  # noqa: F401

    assert cgfac.LayerHelper is LayerHelper and callable(cgfac.register_layer_helper)
    assert isinstance(make_helper("l", nn.Linear(2, 2)), LinearHelper)
    assert make_helper("r", nn.ReLU()) is None
