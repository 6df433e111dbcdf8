"""The communication benchmark (:mod:`cgfac_bench.comm`): a smoke run through the command line."""

from __future__ import annotations

import json

from cgfac_bench import cli


def test_comm_smoke(tmp_path) -> None:
    """``cgfac-bench comm`` writes its projection table; every method sends a positive volume."""
    assert cli.main(["comm", "--tasks", "digits", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comm.json").read_text())
    rows = report["per_rank"]
    assert {r["ranks"] for r in rows} == {2, 8, 64, 512}
    assert all(r["mean_MB"] > 0 and r["max_MB"] >= r["mean_MB"] for r in rows)
    md = (tmp_path / "comm.md").read_text()
    assert "K-FAC comm-opt" in md and "route per layer" in md
    choices = report["cgfac_layer_choice"]
    assert {c["ranks"] for c in choices} == {8, 64, 512}
    for c in choices:  # the cheaper route is chosen
        cheaper = "reduce-factors" if c["reduce_MB"] < c["gather_MB"] else "gather-rows"
        assert c["choice"] == cheaper, c
    # the per-layer choice never sends more than either fixed route
    by = {(r["ranks"], r["method"]): r["mean_MB"] for r in rows}
    for world in (2, 8, 64, 512):
        auto = by[(world, "CG-FAC, per-layer choice (gather rows or reduce factors)")]
        assert auto <= by[(world, "CG-FAC, all rows gathered")] + 1e-12
