"""The width sweep of issue 16 (:mod:`cgfac_bench.sweep`): its summary, and the sweep and the step
profile (smoke + values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cgfac_bench import cli, sweep, train


def test_sweep_summary_picks_the_first_width_where_cgfac_is_sooner() -> None:
    def record(times: dict[str, tuple[float, float]]) -> dict:
        runs = [{"optimizer": n, "lr": 1.0, "diverged": False, "final_train_loss": loss, "ms_per_step": 1.0,
                 "steps": 10, "curve": [[0.0, 0, 200.0], [t, 10, loss]]} for n, (t, loss) in times.items()]
        return {"runs": runs, "best": {r["optimizer"]: i for i, r in enumerate(runs)}}

    records = {"1": record({"cgfac-kron-adaptive": (50.0, 120.0), "adam": (20.0, 90.0)}),
               "2": record({"cgfac-kron-adaptive": (30.0, 80.0), "adam": (40.0, 95.0)})}
    summary = sweep.summarise("autoencoder-wide", ["1", "2"], records, target=100.0)
    table = summary["table"]
    assert table["adam"]["1"]["time_to_target"] == pytest.approx(20 * 100 / 110)  # interpolated from 200 to 90
    assert table["cgfac-kron-adaptive"]["1"]["time_to_target"] is None  # 120 > 100: not reached
    assert summary["overtakes"] == {"adam": "2"}
    assert summary["ahead"] == {"adam": ["2"]}
    # Ahead at the narrowest width only (Muon on the x4 autoencoder): not "from width 1".
    records["3"] = record({"cgfac-kron-adaptive": (30.0, 80.0), "adam": (20.0, 70.0)})
    records["1"] = record({"cgfac-kron-adaptive": (10.0, 80.0), "adam": (20.0, 90.0)})
    summary = sweep.summarise("autoencoder-wide", ["1", "2", "3"], records, target=100.0)
    assert summary["overtakes"] == {"adam": None}
    assert summary["ahead"] == {"adam": ["1", "2"]}


def test_sweep_and_profile_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the runs in this process (a spawned process per run costs seconds of imports; spawning is
    # covered by test_train's smoke tests), the thread count restored after
    from cgfac_bench.loop import train_run

    monkeypatch.setattr(train, "run_isolated", lambda cfg, on_progress: train_run(cfg, on_progress))
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["sweep", "--task", "mlp-wide", "--widths", "8,16", "--target", "2.2",
                       "--out", str(tmp_path / "s"), "--", "--budget", "0.4", "--threads", "1",
                       "--eval-samples", "32", "--batch-size", "32", "--optimizers", "cgfac-kron,adam",
                       "--lr-grid", "cgfac-kron=0.1;adam=0.003"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(summary["table"]) == {"cgfac-kron", "adam"} and summary["widths"] == ["8", "16"]
    assert json.loads((tmp_path / "s" / "w16" / "results.json").read_text())["args"]["width"] == 16
    for name in ("sweep.md", "time_to_target.png", "final_loss.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    rc = cli.main(["profile", "--task", "autoencoder-wide", "--width-mult", "0.1", "--steps", "2", "--warmup", "1",
                   "--threads", "1", "--batch-size", "64", "--hyper", "curvature_samples=16,quad_samples=16",
                   "--out", str(tmp_path / "p")])
    assert rc == 0
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert prof["host_reads_in_pre_step"] == 1
    parts = prof["parts_ms_per_step"]
    assert {"model.forward", "model.backward", "cgfac.precondition", "cgfac.solve",
            "cgfac.optim.quad_model"} <= set(parts)
    assert parts["cgfac.solve"] <= parts["cgfac.precondition"] and math.isfinite(prof["ratio_to_adam"])
