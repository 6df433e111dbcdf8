"""The benchmarks' optimizer factory (:mod:`cgfac_bench.factory`): every registered name builds."""

from __future__ import annotations

import pytest
import torch

from cgfac_bench import factory, train


def test_optimizer_registry_builds_every_name() -> None:
    """Every optimizer name has a builder; the preconditioned ones come with their preconditioner."""
    assert set(factory.BUILDERS) == set(train.ALL_OPTIMIZERS)
    hp = train.SecondOrder(damping=1e-3, kl_clip=1e-3)
    for name in train.ALL_OPTIMIZERS:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt, pre = train.make_optimizer(name, model, 0.1, hp)
        assert isinstance(opt, torch.optim.Optimizer)
        assert (pre is not None) == (name in ("kfac", "cgfac-kron", "cgfac-exact")), name
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train.make_optimizer("adagrad", torch.nn.Linear(4, 3), 0.1, hp)
