"""Hyperparameters (:mod:`cgfac.config`): a callable schedule is checked on every use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cgfac

BOTH = [cgfac.CGFAC, cgfac.KFAC]


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
