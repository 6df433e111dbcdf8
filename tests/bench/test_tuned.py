"""The tuned settings of ``cgfac-bench train --tuned`` (:mod:`cgfac_bench.tuned`) as data: every entry
says where it came from, and :data:`TUNED`'s dictionaries are the table;
the library's wide defaults are the tuned ones."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

import cgfac
from cgfac_bench import train, tuned
from cgfac_bench.hyper import ALL_OPTIMIZERS, SecondOrder
from cgfac_bench.tasks import TASKS

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
ENTRIES = [(task, name, setting) for task, table in tuned.TUNED_SETTINGS.items() for name, setting in table.items()]


@pytest.mark.parametrize(("task", "name", "setting"), ENTRIES, ids=[f"{t}-{n}" for t, n, _ in ENTRIES])
def test_every_tuned_setting_names_its_runs_or_why_not(task: str, name: str, setting: tuned.Tuned) -> None:
    assert task in TASKS and name in ALL_OPTIMIZERS and setting.lr > 0
    provenance = setting.provenance
    assert provenance.runs or provenance.unrecorded, "neither a benchmark directory nor why none"
    for run in provenance.runs:
        assert (BENCHMARKS / run / "results.json").is_file(), f"benchmarks/{run} holds no results.json"
    assert set(setting.hyper) <= {f.name for f in fields(SecondOrder)}
    SecondOrder(**{"damping": 1.0, "kl_clip": None, **setting.hyper})


def test_tuned_dicts_are_the_table() -> None:
    assert list(tuned.TUNED) == list(tuned.TUNED_SETTINGS)
    for task, table in tuned.TUNED_SETTINGS.items():
        assert list(tuned.TUNED[task]) == list(table)  # the order --tuned runs them in
        for name, setting in table.items():
            entry = tuned.TUNED[task][name]
            assert entry["lr"] == setting.lr and entry.get("damping") == setting.damping
            assert entry.get("hyper", {}) == dict(setting.hyper) and set(entry) <= {"lr", "damping", "hyper"}
    assert tuned.WIDE_CGFAC is tuned.TUNED["autoencoder-wide"]["cgfac-kron-adaptive"]


def test_wide_defaults_are_the_tuned_settings_and_step_with_one_read() -> None:
    from host_reads import count_reads

    tuned = train.TUNED["autoencoder-wide"]["cgfac-kron-adaptive"]
    wide = cgfac.optim.WIDE_DEFAULTS
    assert wide["damping"] == tuned["damping"]
    assert all(wide[k] == v for k, v in tuned["hyper"].items())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 300), nn.Tanh(), nn.Linear(300, 50))
    opt = cgfac.optim.CGFAC.wide(model, loss_type="gaussian", curvature_samples=16, quad_samples=16)
    pre = opt.preconditioner
    assert (pre.curvature_samples, pre.solver, pre.damping_form, pre.fisher) == (16, "lowrank", "factored", "true")
    x = torch.randn(64, 50)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (model(x) - x).pow(2).sum(1).mean()
        loss.backward()
        return loss

    first = float(closure())
    inner = pre.step
    reads: list[int] = []

    def counted() -> None:
        with count_reads() as seen:
            inner()
        reads.append(len(seen))

    pre.step = counted  # type: ignore[method-assign]
    for _ in range(5):
        opt.step(closure)
    assert reads == [1] * 5
    assert float(closure()) < first
    assert all(st.solver.solution is None for st in pre.states.values())
