"""Per-layer state in one place: the preconditioners hold ``dict[name, LayerState]`` and
checkpoint through it, with the per-layer keys users see unchanged."""

from __future__ import annotations

import torch
from torch import nn

import cgfac
from cgfac.curvature import RowWindow, RunningFactors
from cgfac.precondition.state import LayerState


def stepped(pre_cls, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    pre = pre_cls(model, kl_clip=None, **kwargs)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(16, 5, dtype=torch.float64)).pow(2).mean().backward()
        pre.step()
    return pre


def test_cgfac_layer_states() -> None:
    pre = stepped(cgfac.CGFAC, solver="cg", curvature_window=2)
    assert set(pre.states) == set(pre.layers) == {"0", "2"}
    for name, state in pre.states.items():
        assert isinstance(state, LayerState) and state.helper is pre.layers[name]
        assert isinstance(state.curvature, RowWindow) and len(state.curvature) == 2
        assert state.solver.solution is not None and pre.solutions[name] is state.solver.solution
        assert state.stats is pre.stats[name] and state.stats["method"] == "cg"
        saved = state.state_dict()
        assert set(saved) == {"shape", "window", "solution", "last_iters", "iters_damping"}
    assert pre.state_dict()["layers"]["0"]["shape"] == (7, 6)


def test_kfac_layer_states_and_views() -> None:
    pre = stepped(cgfac.KFAC, inv_update_steps=1, factor_warmup="mean")
    for name, state in pre.states.items():
        assert isinstance(state.curvature, RunningFactors) and state.curvature.updates == 2
        assert pre.factors[name] is state.curvature.tensors
        assert pre.eigen[name] is state.solver.decomposition and pre.eigen_age[name] == 0
        assert set(state.state_dict()) == {"shape", "factors", "factor_updates", "eigen", "eigen_age"}
    assert pre.factor_updates == {"0": 2, "2": 2}


def test_stats_view_behaves_like_the_old_dict() -> None:
    pre = stepped(cgfac.CGFAC, solver="lowrank")
    assert set(pre.layer_stats()) == {"0", "2"}
    pre.stats = {}
    assert pre.layer_stats() == {}
    pre.stats["0"] = {"damping": 1.0}
    assert pre.layer_stats() == {"0": {"damping": 1.0}}
    pre.stats.clear()
    assert len(pre.stats) == 0
