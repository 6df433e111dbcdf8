"""Conv1d/2d/3d with groups (depthwise included), every padding mode and asymmetric ``"same"``:
directions of every method against dense solves (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from layer_reference import (
    EXACT_KINDS,
    KRON_KINDS,
    exact_direction,
    kron_direction,
    library_directions,
    output_grads,
    per_sample_params,
)
from torch import nn

from cgfac.layers import unfold_patches

MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def ref_pads(conv) -> list[int]:
    """``F.pad`` amounts, written out from the definition of ``padding``."""
    out = []
    for i in reversed(range(len(conv.kernel_size))):
        k, d = conv.kernel_size[i], conv.dilation[i]
        if conv.padding == "same":
            out += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        elif conv.padding == "valid":
            out += [0, 0]
        else:
            out += [conv.padding[i], conv.padding[i]]
    return out


def ref_rows(x: torch.Tensor, conv, group: int) -> torch.Tensor:
    """Patch rows of one group by explicit slicing (ones column when there is a bias)."""
    per_in = conv.in_channels // conv.groups
    xp = F.pad(x[:, group * per_in: (group + 1) * per_in], ref_pads(conv), mode=MODES[conv.padding_mode])
    spans = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    outs = [(size - span) // s + 1 for size, span, s in zip(xp.shape[2:], spans, conv.stride)]
    rows = []
    for pos in itertools.product(*(range(o) for o in outs)):
        idx = tuple(slice(p * s, p * s + span, d) for p, s, span, d in zip(pos, conv.stride, spans, conv.dilation))
        rows.append(xp[(slice(None), slice(None), *idx)].reshape(x.shape[0], -1))
    a = torch.stack(rows, 1).reshape(-1, rows[0].shape[1])
    if conv.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a


def group_matrix(conv, weight, bias, group: int) -> torch.Tensor:
    per_out = conv.out_channels // conv.groups
    nd = len(conv.kernel_size)
    w = weight.narrow(weight.dim() - nd - 2, group * per_out, per_out).flatten(-nd - 1)
    if bias is not None:
        w = torch.cat([w, bias.narrow(bias.dim() - 1, group * per_out, per_out).unsqueeze(-1)], -1)
    return w


CASES = {
    "1d-same-asym": (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 7)),
    "1d-groups-reflect-stride": (lambda: nn.Conv1d(4, 4, 3, groups=2, stride=2, padding=1,
                                                   padding_mode="reflect"), (4, 7)),
    "2d-depthwise-replicate": (lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1, padding_mode="replicate"), (3, 4, 4)),
    "2d-depthwise-mult-circular-nobias": (lambda: nn.Conv2d(2, 4, 2, groups=2, padding=1, dilation=2, bias=False,
                                                            padding_mode="circular"), (2, 4, 4)),
    "2d-same-asym-reflect": (lambda: nn.Conv2d(2, 2, (2, 3), padding="same", padding_mode="reflect"), (2, 4, 4)),
    "3d-groups-zeros": (lambda: nn.Conv3d(2, 2, 2, groups=2, padding=(1, 0, 1)), (2, 3, 3, 2)),
}


def setup(case: str):
    make_conv, shape = CASES[case]
    torch.manual_seed(0)
    conv = make_conv().double()
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out_shape.numel(), 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    return model, conv, x, y


def test_patches_match_f_unfold() -> None:
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    want = F.unfold(x, (3, 2), dilation=(1, 2), stride=(2, 1)).transpose(1, 2).reshape(-1, 3 * 3 * 2)
    torch.testing.assert_close(unfold_patches(x, (3, 2), (2, 1), (1, 2)), want)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_rows_reproduce_the_convolution(case: str) -> None:
    """The reference's padding and patches rebuild the layer's output (so the rows are right)."""
    _, conv, x, _ = setup(case)
    out = conv(x)
    per_out = conv.out_channels // conv.groups
    for j in range(conv.groups):
        a = ref_rows(x, conv, j)
        w = group_matrix(conv, conv.weight, conv.bias, j)
        got = (a @ w.T).reshape(x.shape[0], -1, per_out).transpose(1, 2)
        torch.testing.assert_close(got, out[:, j * per_out: (j + 1) * per_out].flatten(2))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_conv_direction_matches_dense_solve(case: str, kind: str) -> None:
    model, conv, x, y = setup(case)
    n = x.shape[0]
    inputs, gouts = output_grads(model, {"conv": conv}, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    F.cross_entropy(model(x), y).backward()
    mean_w, mean_b = conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone()
    model.zero_grad()
    if "exact" in kind:
        ps = per_sample_params(model, F.cross_entropy, x, y)
        jac_w, jac_b = ps["0.weight"], ps.get("0.bias")
    pre, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    per_out = conv.out_channels // conv.groups
    units = [u for u in pre.layers if u.startswith("0")]
    assert len(units) == conv.groups
    for j in range(conv.groups):
        grad_w = group_matrix(conv, mean_w, mean_b, j)
        if "exact" in kind:
            want = exact_direction(group_matrix(conv, jac_w, jac_b, j), grad_w)
        else:
            g = gouts["conv"][:, j * per_out: (j + 1) * per_out].flatten(2).transpose(1, 2).reshape(-1, per_out)
            want = kron_direction(ref_rows(inputs["conv"], conv, j), g, n, grad_w)
        torch.testing.assert_close(group_matrix(conv, got["0.weight"], got.get("0.bias"), j), want,
                                   rtol=1e-8, atol=1e-10)
    for name, st in pre.layer_stats().items():
        assert "fallback" not in st, (name, st)


def test_transposed_conv_is_reported() -> None:
    import cgfac

    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3), nn.Flatten(), nn.Linear(2 * 36, 2))
    report = {e.name: e for e in cgfac.CGFAC(model).registration_report()}
    assert not report["0"].covered and "transposed" in report["0"].reason
