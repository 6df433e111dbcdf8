"""The preconditioners' keywords (:mod:`cgfac.precondition.settings`): bad arguments raise naming the argument."""

from __future__ import annotations

import pytest
from torch import nn

import cgfac


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
