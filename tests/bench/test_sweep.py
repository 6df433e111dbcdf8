"""The wide tasks of issue 16: models, Muon's split, the width sweep and the step profile (smoke + values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import cgfac
from cgfac.solvers import CG_PROBE_STEPS
from cgfac_bench import cli, peers, sweep, train
from cgfac_bench.models import build_model, wide_widths


def test_wide_models_scale_the_hidden_widths() -> None:
    assert wide_widths(1) == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert wide_widths(4) == (784, 4000, 2000, 1000, 30, 1000, 2000, 4000, 784)
    model = build_model("autoencoder-wide", width_mult=0.5)
    shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
    assert shapes[0] == (500, 784) and shapes[3] == (30, 125) and shapes[-1] == (784, 500)
    assert model(torch.rand(3, 784)).shape == (3, 784)
    mlp = build_model("mlp-wide", width=32)
    assert [tuple(m.weight.shape) for m in mlp if isinstance(m, nn.Linear)] == [(32, 784), (32, 32), (32, 32), (10, 32)]
    with pytest.raises(ValueError, match="width_mult"):
        wide_widths(0)
    with pytest.raises(ValueError, match="do not apply"):
        build_model("mlp", width=3)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    torch.manual_seed(0)
    model = build_model("mlp-wide", width=16)
    hidden, rest = peers.hidden_matrices(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [id(p) for p in hidden] == [id(m.weight) for m in linears[:-1]]
    assert {id(p) for p in rest} == {id(linears[-1].weight)} | {id(m.bias) for m in linears}
    opt = peers.muon_with_adamw(model, 1e-3)
    assert isinstance(opt.optimizers[0], torch.optim.Muon) and isinstance(opt.optimizers[1], torch.optim.AdamW)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.load_state_dict(opt.state_dict())


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
    # covered by test_bench_train's smoke tests), the thread count restored after
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


@pytest.mark.parametrize(("o_iter", "copy_kept"), [(3e7, False), (1e5, True)])
def test_no_warm_start_copy_where_cg_cannot_win(o_iter: float, copy_kept: bool) -> None:
    """Wide layer, few rows: where no CG solve or probe could win (each CG product's overhead too
    large) the automatic choice solves by low rank and keeps no d_out × d_in copy, even at the steps
    where a periodic probe would be due; where CG can win (small overhead), the copy is kept for it. The
    cost constants are fixed: measured, this layer sits near the break-even on a 2-core CPU and the
    outcome would follow the load."""
    from cgfac.solvers.base import CostConstants

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 300))
    pre = cgfac.CGFAC(model, curvature_samples=4, kl_clip=None)
    pre.cost_constants = CostConstants(c_eig=15.3, c_solve=3.33, c_qr=18.4, thin=1.33, o_iter=o_iter, o_call=2.75e7)
    x = torch.randn(16, 300)
    for _ in range(CG_PROBE_STEPS + 2):
        model.zero_grad()
        (model(x) - x).pow(2).sum(1).mean().backward()
        pre.step()
        if not copy_kept:
            assert all(st.solver.solution is None for st in pre.states.values())
    assert all((st.solver.solution is not None) == copy_kept for st in pre.states.values())
    if not copy_kept:
        assert {st["method"] for st in pre.layer_stats().values()} == {"lowrank"}


def test_wide_defaults_are_the_tuned_settings_and_step_with_one_read() -> None:
    from host_reads import count_reads

    tuned = train.TUNED["autoencoder-wide"]["cgfac-kron-adaptive"]
    wide = cgfac.optim.WIDE_DEFAULTS
    assert wide["damping"] == tuned["damping"]
    assert all(wide[k] == v for k, v in tuned["hyper"].items())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 300), nn.Tanh(), nn.Linear(300, 50))
    opt = cgfac.optim.CGFAC.wide(model, loss_type="gaussian", curvature_samples=16, quad_samples=16)
    pre = opt.preconditioner
    assert (pre.curvature_samples, pre.solver, pre.damping_form, pre.fisher) == (16, "lowrank", "factored", "true")
    x = torch.randn(64, 50)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (model(x) - x).pow(2).sum(1).mean()
        loss.backward()
        return loss

    first = float(closure())
    inner = pre.step
    reads: list[int] = []

    def counted() -> None:
        with count_reads() as seen:
            inner()
        reads.append(len(seen))

    pre.step = counted  # type: ignore[method-assign]
    for _ in range(5):
        opt.step(closure)
    assert reads == [1] * 5
    assert float(closure()) < first
    assert all(st.solver.solution is None for st in pre.states.values())
