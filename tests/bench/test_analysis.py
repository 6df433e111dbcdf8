"""The benchmarks' analysis (:mod:`cgfac_bench.analysis`, :mod:`cgfac_bench.hyper`'s grid): learning-rate
grids, targets, times to a target and the held-out race per seed."""

from __future__ import annotations

import math

import pytest

from cgfac_bench import train


def test_lr_grid_and_target_helpers() -> None:
    assert train.parse_lr_grid(None, ["adam"]) == {"adam": list(train.LR_GRID["adam"])}
    assert train.parse_lr_grid("0.5", ["adam", "sgd"]) == {"adam": [0.5], "sgd": [0.5]}
    assert train.parse_lr_grid("sgd=0.2,0.4", ["adam", "sgd"])["sgd"] == [0.2, 0.4]
    for bad in ("kfac=0.1", "adam=-1", "adam=x"):
        with pytest.raises(ValueError):
            train.parse_lr_grid(bad, ["adam"])
    runs = [{"optimizer": "adam", "curve": [(0.0, 0, 3.0), (1.0, 10, 1.0)]},
            {"optimizer": "kfac", "curve": [(0.0, 0, 3.0), (0.5, 4, 0.9)]}]
    target = train.adam_target(runs)
    assert target == 1.0
    assert train.time_to(runs[1], target) == 0.5 and train.time_to(runs[1], 0.1) is None


def _lm_run(optimizer: str, seed: int, heldout: list[tuple[float, int, float]], lr: float = 1e-3) -> dict:
    return {"optimizer": optimizer, "lr": lr, "damping": None, "seed": seed, "diverged": False,
            "final_train_loss": heldout[-1][2], "curve": heldout, "heldout_curve": heldout}


def test_heldout_race_per_seed() -> None:
    """Each seed's target is the reference's final held-out loss on that seed; times interpolate
    between evaluations; the ratio divides by the reference's own time; a miss is None and inf."""
    runs = [_lm_run("adamw", 0, [(0.0, 0, 5.0), (10.0, 9, 3.0), (20.0, 18, 2.0)]),
            _lm_run("adamw", 1, [(0.0, 0, 5.0), (10.0, 9, 2.5), (20.0, 18, 2.2)]),
            _lm_run("adamw", 0, [(0.0, 0, 5.0), (10.0, 9, 4.0), (20.0, 18, 3.0)], lr=1e-4),  # not the best
            _lm_run("kfac", 0, [(0.0, 0, 5.0), (10.0, 7, 2.5), (20.0, 14, 1.5)]),
            _lm_run("kfac", 1, [(0.0, 0, 5.0), (10.0, 7, 2.6), (20.0, 14, 2.4)]),
            _lm_run("muon-original", 0, [(0.0, 0, 5.0), (10.0, 8, 1.0), (20.0, 16, 0.5)]),
            _lm_run("muon-original", 1, [(0.0, 0, 5.0), (10.0, 8, 1.2), (20.0, 16, 0.7)])]
    to_adamw = train.heldout_times(runs, "adamw")
    assert to_adamw["adamw"]["target"] == [2.0, 2.2] and to_adamw["adamw"]["ratio"] == [1.0, 1.0]
    kfac = to_adamw["kfac"]
    assert kfac["seeds"] == [0, 1] and kfac["target"] == [2.0, 2.2]
    assert kfac["seconds"][0] == pytest.approx(15.0)  # 2.5 at 10 s, 1.5 at 20 s: 2.0 halfway
    assert kfac["seconds"][1] is None and kfac["ratio"] == [pytest.approx(0.75), None]
    assert kfac["median_ratio"] == math.inf  # one of two seeds missed
    assert train.best_peer_heldout(runs) == "muon-original"
    to_muon = train.heldout_times(runs, "muon-original")
    assert to_muon["kfac"]["seconds"] == [None, None] and to_muon["muon-original"]["ratio"] == [1.0, 1.0]
    assert train.heldout_times(runs, "soap") == {}
    record = {"settings": {"eval_samples": 256}, "runs": runs,
              "heldout": {"reference": "adamw", "best_peer": "muon-original", "to_reference": to_adamw,
                          "to_best_peer": to_muon}}
    table = "\n".join(train.heldout_lines(record))
    # final held-out 1.5 and 2.4 nats = 2.1640 and 3.4625 bits/byte
    assert ("| kfac | 2.8133 [2.1640, 3.4625] | not reached [15.0, not reached] | not reached [0.75, not reached] | "
            "not reached [not reached, not reached] | not reached [not reached, not reached] |") in table
    assert "| adamw | 3.0297 [2.8854, 3.1739] | 20.0 [20.0, 20.0] | 1.00 [1.00, 1.00] |" in table
