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
