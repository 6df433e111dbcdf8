"""The solver-choice benchmark (:mod:`cgfac_bench.choice`): a tiny run through the command line."""

from __future__ import annotations

import json
import math

from cgfac_bench import cli


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


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
