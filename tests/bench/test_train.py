"""Smoke tests of ``cgfac-bench train`` (:mod:`cgfac_bench.train`) on the quick digits task, its tuned
settings and ``--hyper`` overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cgfac_bench import cli, loop, tasks, train

GRID = "cgfac-kron=0.1;cgfac-exact=0.1;kfac=0.1;adam=0.003;sgd=0.1"


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The runs in this process, the thread count restored after: a spawned process per run costs
    seconds of imports. Spawning itself is covered by :func:`test_tuned_settings_with_hyper_overrides`
    (and torchrun by :func:`test_train_on_two_processes_through_torchrun`)."""
    monkeypatch.setattr(train, "run_isolated", lambda cfg, on_progress: loop.train_run(cfg, on_progress))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_smoke(tmp_path: Path, in_process: None) -> None:
    rc = cli.main(["train", "--task", "digits", "--budget", "0.5", "--eval-every", "0.1", "--threads", "1",
                   "--lr-grid", GRID, "--out", str(tmp_path)])
    assert rc == 0
    for name in ("results.json", "results.md", "loss_vs_time.png", "loss_vs_steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["best"]) == set(train.OPTIMIZERS)
    assert len(record["runs"]) == len(train.OPTIMIZERS)
    for name, index in record["best"].items():
        run = record["runs"][index]
        assert run["optimizer"] == name and "error" not in run and not run["diverged"]
        assert math.isfinite(run["final_train_loss"]) and run["steps"] > 0
        assert run["curve"][0][:2] == [0.0, 0] and run["curve"][-1][0] >= 0.5
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["peak_rss_mb"] > 0
    assert math.isfinite(record["target_train_loss"])
    assert record["time_to_target"]["adam"] is not None
    assert record["machine"]["torch"] == torch.__version__ and record["settings"]["hyper"]["damping"] > 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in train.OPTIMIZERS)


def test_divergence_is_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite loss stops the run and marks it diverged; it never wins 'best'."""
    train.save_arrays(train.load_task_data("digits"), tmp_path)
    real_loss, calls = train.task_loss, []

    def poisoned(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * math.nan if len(calls) > 20 else loss

    monkeypatch.setattr(tasks, "task_loss", poisoned)  # the evaluations' loss
    monkeypatch.setattr(loop, "task_loss", poisoned)  # the training steps
    cfg = {"task": "digits", "optimizer": "kfac", "lr": 0.1, "budget": 5.0, "batch_size": 64, "seed": 0,
           "device": "cpu", "threads": 1, "eval_every": 100.0, "eval_samples": 100, "data_dir": str(tmp_path),
           "hyper": {"damping": 3e-3, "kl_clip": 1e-3}}
    run = train.train_run(cfg)
    assert run["diverged"] and run["train_seconds"] < 5.0 and not math.isfinite(run["final_train_loss"])
    ok = {**run, "diverged": False, "final_train_loss": 2.0, "lr": 0.3}
    assert train.best_runs([run, ok])["kfac"] is ok
    assert train.best_runs([run])["kfac"] is run


def test_train_on_two_processes_through_torchrun(tmp_path: Path) -> None:
    """``--nproc 2``: each run is launched by torchrun (gloo) with DDP; rank 0 reports."""
    out = tmp_path / "ddp"
    code = cli.main(["train", "--task", "digits", "--budget", "1", "--optimizers", "cgfac-kron",
                     "--lr-grid", "0.1", "--nproc", "2", "--threads", "2", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    (run,) = record["runs"]
    assert "error" not in run, run.get("traceback")
    assert run["processes"] == 2 and run["steps"] > 0 and math.isfinite(run["final_train_loss"])


def _run_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, optimizers: str, grid: str) -> dict:
    monkeypatch.setattr(tasks, "TEXT_MAX_TRAIN_BYTES", 64 * 1024)  # the parent loads the data for the runs
    monkeypatch.setattr(tasks, "TEXT_MAX_TEST_BYTES", 8 * 1024)
    rc = cli.main(["train", "--task", task, "--budget", "0.5", "--threads", "1", "--eval-samples", "16",
                   "--optimizers", optimizers, "--lr-grid", grid, "--out", str(tmp_path)])
    assert rc == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_train_transformer_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process: None) -> None:
    """The byte-level LM: held-out bits per byte and coverage recorded, and shown in the table."""
    record = _run_task(tmp_path, monkeypatch, "transformer", "kfac,adamw", "kfac=0.1;adamw=0.003")
    assert record["settings"]["eval_samples"] == 16 and record["settings"]["batch_size"] == 32
    for run in record["runs"]:
        assert "error" not in run, run.get("traceback")
        assert run["steps"] > 0 and math.isfinite(run["final_train_loss"])
        assert run["test_bits_per_byte"] == pytest.approx(run["test_loss"] / math.log(2))
        assert 0 < run["test_bits_per_byte"] < 9  # a uniform guess over 256 bytes is 8 bits
    kfac = record["runs"][record["best"]["kfac"]]
    assert kfac["coverage"]["covered"] == kfac["coverage"]["total"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "held-out bits/byte" in table and "| adamw |" in table and "| kfac |" in table


def test_train_cnn_norm_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process: None) -> None:
    full = train.load_task_data  # MNIST's 10k test images through the CNN would be most of the test's time

    def fewer_test_images(task: str) -> dict:
        return {k: v[:500] if k.startswith("test_") else v for k, v in full(task).items()}

    monkeypatch.setattr(train, "load_task_data", fewer_test_images)
    record = _run_task(tmp_path, monkeypatch, "cnn-norm", "kfac", "0.1")
    (run,) = record["runs"]
    assert "error" not in run, run.get("traceback")
    assert run["steps"] > 0 and 0.0 <= run["test_accuracy"] <= 1.0
    assert run["coverage"]["covered"] == run["coverage"]["total"]


def test_adaptive_on_transformer_reports_forward_ad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cgfac.optim's forward-mode products fail through nn.MultiheadAttention's fused CPU attention
    (torch 2.13: no forward AD for _scaled_dot_product_flash_attention_for_cpu); the run says so."""
    monkeypatch.setattr(tasks, "TEXT_MAX_TRAIN_BYTES", 64 * 1024)
    monkeypatch.setattr(tasks, "TEXT_MAX_TEST_BYTES", 8 * 1024)
    train.save_arrays(train.load_task_data("transformer"), tmp_path)
    cfg = {"task": "transformer", "optimizer": "kfac-adaptive", "lr": 1.0, "budget": 5.0, "batch_size": 4,
           "seed": 0, "device": "cpu", "threads": 1, "eval_every": 100.0, "eval_samples": 4,
           "data_dir": str(tmp_path), "hyper": {"damping": 3e-3, "kl_clip": 1e-3}}
    try:
        run = train.train_run(cfg)
    except RuntimeError as err:
        assert "forward-mode AD" in str(err)
    else:  # a torch with forward AD through the fused attention
        assert run["steps"] > 0


def test_tuned_settings_with_hyper_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tuned`` runs each listed optimizer at its tuned lr, damping and SecondOrder overrides."""
    monkeypatch.setitem(train.TUNED, "digits", {
        "cgfac-kron-adaptive": {"lr": 0.5, "damping": 0.05, "hyper": {"curvature_window": 3}},
        "adam": {"lr": 2e-3},
    })
    rc = cli.main(["train", "--task", "digits", "--tuned", "--budget", "0.3", "--eval-every", "0.1",
                   "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    record = json.loads((tmp_path / "results.json").read_text())
    runs = {r["optimizer"]: r for r in record["runs"]}
    assert set(runs) == {"cgfac-kron-adaptive", "adam"}
    assert runs["cgfac-kron-adaptive"]["lr"] == 0.5 and runs["cgfac-kron-adaptive"]["damping"] == 0.05
    assert runs["cgfac-kron-adaptive"]["hyper"]["curvature_window"] == 3
    assert runs["adam"]["lr"] == 2e-3 and runs["adam"]["hyper"]["curvature_window"] == 1
    assert "curvature window 3" in (tmp_path / "results.md").read_text()


def test_hyper_flag_parses_and_overrides_tuned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               in_process: None) -> None:
    """``--hyper field=value,...`` sets SecondOrder fields (typed), over the tuned ones; bad fields fail."""
    assert train.parse_hyper("kfac_samples=250,min_damping=1e-3,damping_form=factored,quad_samples=none") == {
        "kfac_samples": 250, "min_damping": 1e-3, "damping_form": "factored", "quad_samples": None}
    assert train.parse_hyper(None) == {}
    with pytest.raises(ValueError, match="--hyper"):
        train.parse_hyper("no_such_field=1")
    with pytest.raises(ValueError, match="--hyper"):
        train.parse_hyper("min_damping")
    monkeypatch.setitem(train.TUNED, "digits", {
        "kfac-adaptive": {"lr": 1.0, "damping": 0.05, "hyper": {"inv_update_steps": 3, "min_damping": 1e-2}}})
    rc = cli.main(["train", "--task", "digits", "--tuned", "--budget", "0.3", "--eval-every", "0.1",
                   "--threads", "1", "--hyper", "min_damping=1e-4,kfac_samples=16,damping_form=factored",
                   "--out", str(tmp_path)])
    assert rc == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["hyper"]["inv_update_steps"] == 3  # tuned, kept
    assert run["hyper"]["min_damping"] == 1e-4 and run["hyper"]["kfac_samples"] == 16
    assert "factored damping" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="--hyper"):
        cli.main(["train", "--task", "digits", "--hyper", "bogus=1", "--out", str(tmp_path)])
