"""Smoke tests of ``cgfac-bench layer`` (:mod:`cgfac_bench.layer`) on tiny problems (no timing checks): its
memory probe, log-log slope, a quick run and its time limit."""

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
