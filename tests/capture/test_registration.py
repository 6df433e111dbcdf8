"""Registration (:mod:`cgfac.capture.registration`): the report, uncovered, frozen and skipped layers,
models without layers."""

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


def test_model_without_layers_and_non_module() -> None:
    with pytest.raises(ValueError, match="model"):
        cgfac.CGFAC(nn.Sequential(nn.ReLU(), nn.PReLU()))
    with pytest.raises(TypeError, match="model"):
        cgfac.KFAC("not a model")
