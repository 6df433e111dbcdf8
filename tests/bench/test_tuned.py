"""The tuned settings of ``cgfac-bench train --tuned`` (:mod:`cgfac_bench.tuned`) as data: every entry
says where it came from, and :data:`TUNED`'s dictionaries are the table."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from cgfac_bench import tuned
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
