"""The CG-iterations benchmark (:mod:`cgfac_bench.cg_iters`): a smoke run through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cgfac_bench import cli


def test_cg_iters_smoke(tmp_path: Path) -> None:
    rc = cli.main(["cg-iters", "--task", "digits", "--steps", "4", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("results.json", "results.md", "cg_iters.png"):
        assert (tmp_path / name).stat().st_size > 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["train_loss"]) == 4 and all(math.isfinite(v) for v in record["train_loss"])
    for layer in record["layers"].values():
        assert len(layer["warm"]) == len(layer["cold"]) == 4
        assert layer["warm"][0] == layer["cold"][0]  # step 0: both start from zero on the same system
        assert all(isinstance(i, int) and 0 <= i <= 200 for i in layer["warm"] + layer["cold"])
        assert layer["cold_summary"]["solves"] == 3
    assert "| all |" in (tmp_path / "results.md").read_text()
