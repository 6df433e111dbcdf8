"""The ``gpt2`` benchmark task (a Hugging Face GPT-2 with tied embeddings on the standard library's
text) and its Muon peer, run for about a second each in-process, on a shrunken model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cgfac_bench import hf, models, peers, tasks, train

pytest.importorskip("transformers")


def test_gpt2_task_model_is_tied_and_sized() -> None:
    torch.manual_seed(0)
    model = models.build_model("gpt2")
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 20e6
    inner = model.model
    assert inner.lm_head.weight is inner.transformer.wte.weight
    hidden, rest = peers.hidden_matrices(model)
    assert all(p.dim() == 2 for p in hidden) and inner.transformer.wte.weight in rest
    assert len(hidden) == 4 * hf.GPT2_SIZE["n_layer"]  # c_attn, attn.c_proj, c_fc, mlp.c_proj


@pytest.mark.parametrize("optimizer", ["kfac", "muon-original"])
def test_gpt2_task_runs(optimizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(hf.GPT2_SIZE, "n_embd", 32)
    monkeypatch.setitem(hf.GPT2_SIZE, "n_layer", 2)
    monkeypatch.setitem(hf.GPT2_SIZE, "n_head", 2)
    monkeypatch.setattr(tasks, "TEXT_MAX_TRAIN_BYTES", 64 * 1024)
    monkeypatch.setattr(tasks, "TEXT_MAX_TEST_BYTES", 8 * 1024)
    train.save_arrays(train.load_task_data("gpt2"), tmp_path)
    tuned = train.TUNED["gpt2"][optimizer]
    cfg = {"task": "gpt2", "optimizer": optimizer, "lr": tuned["lr"], "budget": 1.0, "batch_size": 4, "seed": 0,
           "device": "cpu", "threads": 1, "eval_every": 0.5, "eval_samples": 16, "data_dir": str(tmp_path),
           "damping": tuned.get("damping"), "hyper": {"damping": 1e-3, "kl_clip": None},
           "hyper_overrides": tuned.get("hyper", {})}
    run = train.train_run(cfg)
    assert not run["diverged"] and run["steps"] > 0 and math.isfinite(run["test_bits_per_byte"])
    assert run["final_train_loss"] < run["curve"][0][2]  # it learns something in a second
    # the held-out curve: at every evaluation, off the clock
    assert [c[:2] for c in run["heldout_curve"]] == [c[:2] for c in run["curve"]]
    assert all(math.isfinite(c[2]) for c in run["heldout_curve"])
    assert run["heldout_curve"][-1][2] < run["heldout_curve"][0][2]
    if optimizer == "kfac":
        assert run["coverage"]["covered"] == run["coverage"]["total"]  # tied head and Conv1D included
        assert "model.transformer.wte+model.lm_head" in run["last_layer_stats"]


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
