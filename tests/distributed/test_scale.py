"""World-size-independent checkpoints, true Fisher under DDP, non-finite values on one rank.

One ``torchrun`` launch of 2 gloo processes (``scale_worker.py``) against single-process float64
references computed here: a checkpoint of one process resumed on two, one of two resumed on one,
each giving the directions of an uninterrupted run (to 1e-7 relative: rank-summed
factors differ from one process's in rounding, which K-FAC's eigendecompositions amplify).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scale_worker as sw
import torch

import cgfac

WORKER = Path(__file__).with_name("scale_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1",
       "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


def single(kind: str, start: int, stop: int, state: dict | None = None) -> list[list[torch.Tensor]]:
    """One process: directions of steps ``start..stop-1`` (from ``state`` if given)."""
    model, trained, opt, pre = sw.setup(kind, 1, sw.RESUMABLE)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pre.load_state_dict(state["pre"])
    return sw.run_steps(trained, model, opt, pre, start, stop, 0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scale")
    states = {}
    for kind in sw.RESUMABLE:  # one process, SAVE_AT steps, then its checkpoint
        model, trained, opt, pre = sw.setup(kind, 1, sw.RESUMABLE)
        sw.run_steps(trained, model, opt, pre, 0, sw.SAVE_AT, 0, 1)
        states[kind] = sw.checkpoint(model, opt, pre, sw.SAVE_AT)
    cgfac.checkpoint.save_atomic(states, out / "one.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--load", str(out / "one.pt"), "--save", str(out / "two.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = {kind: single(kind, 0, sw.SAVE_AT + sw.RESUME_STEPS)[sw.SAVE_AT:] for kind in sw.RESUMABLE}
    return {"ranks": ranks, "reference": reference, "two": torch.load(out / "two.pt", weights_only=True)}


@pytest.mark.parametrize("kind", list(sw.RESUMABLE))
def test_one_process_checkpoint_resumes_on_two(runs, kind: str) -> None:
    for r, result in enumerate(runs["ranks"]):
        for step, (got, want) in enumerate(zip(result["resume"][kind], runs["reference"][kind])):
            assert rel_err(got, want) < 1e-7, (kind, r, step, rel_err(got, want))


@pytest.mark.parametrize("kind", list(sw.RESUMABLE))
def test_two_process_checkpoint_resumes_on_one(runs, kind: str) -> None:
    saved = runs["two"][kind]
    assert saved["pre"]["full"] and saved["pre"]["world_size"] == 2 and len(saved["pre"]["rank_generators"]) == 2
    got = single(kind, sw.SAVE_AT, sw.SAVE_AT + sw.RESUME_STEPS, saved)
    for step, (g, w) in enumerate(zip(got, runs["reference"][kind])):
        assert rel_err(g, w) < 1e-7, (kind, step, rel_err(g, w))


def test_the_layers_state_comes_from_their_owners(runs) -> None:
    """CG-FAC's row windows live on the owners only; the full state has every layer's window."""
    for layer in runs["two"]["cgfac-cg-window"]["pre"]["layers"].values():
        assert len(layer["window"]) == 3 and "solution" in layer
    for layer in runs["two"]["kfac-mem-opt"]["pre"]["layers"].values():
        assert "eigen" in layer and layer["eigen_age"] == 0


def test_a_ranks_own_state_is_refused_on_another_world_size() -> None:
    pre = cgfac.CGFAC(sw.net())
    state = pre.state_dict()
    state.update(world_size=2, rank=1, full=False)
    with pytest.raises(ValueError, match="full_state_dict"):
        pre.load_state_dict(state)


def test_saved_state_loads_with_weights_only() -> None:
    for make in [*sw.RESUMABLE.values(), lambda m: cgfac.CGFAC(m, fisher="true")]:
        model = sw.net()
        pre = make(model)
        x, y = sw.batch(0)
        out = model(x)
        if pre.fisher == "true":
            pre.sample_fisher(out, "cross_entropy")
        torch.nn.functional.cross_entropy(out, y).backward()
        pre.step()
        buf = io.BytesIO()
        torch.save(cgfac.checkpoint.full_state_dict(pre), buf)
        buf.seek(0)
        fresh = make(sw.net())
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert fresh.steps == 1


def test_full_state_dict_arguments() -> None:
    with pytest.raises(TypeError, match="pre"):
        cgfac.checkpoint.full_state_dict(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dst"):
        cgfac.checkpoint.full_state_dict(cgfac.KFAC(sw.net()), dst=1)


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    cgfac.checkpoint.save_atomic({"step": 1}, path)

    def broken_save(obj, f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cgfac.checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    with pytest.raises(ValueError, match="path"):
        cgfac.checkpoint.save_atomic({}, tmp_path)
    with pytest.raises(TypeError, match="path"):
        cgfac.checkpoint.save_atomic({}, 3)


@pytest.mark.parametrize("kind", list(sw.TRUE_FISHER))
def test_true_fisher_under_ddp_matches_one_process_with_the_same_targets(runs, kind: str) -> None:
    want = sw.true_fisher(kind, None, 2)
    for r, result in enumerate(runs["ranks"]):
        got = result["true_fisher"][kind]
        assert got["grads_untouched"], "the sampled backward wrote .grad (DDP all-reduced it)"
        for step, (g, w) in enumerate(zip(got["directions"], want["directions"])):
            assert rel_err(g, w) < 1e-9, (kind, r, step, rel_err(g, w))
        assert rel_err(got["params"], want["params"]) < 1e-9


def test_true_fisher_ranks_sample_their_own_streams(runs) -> None:
    seeds = [result["true_fisher"]["cgfac"]["seed"] for result in runs["ranks"]]
    assert seeds[0] != seeds[1]
    gens = sw.rank_generators(2)
    assert [g.initial_seed() for g in gens] == seeds


def test_one_process_keeps_its_sampling_stream() -> None:
    """A single process draws the seed it always drew (the first number of the seed generator)."""
    pre = cgfac.CGFAC(sw.net(), fisher="true", seed=7)
    want = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(7)))
    assert pre.sampling_generator("cpu").initial_seed() == want


@pytest.mark.parametrize("cls", ["CGFAC", "KFAC"])
def test_non_finite_rows_on_one_rank_lead_every_rank_to_the_same_decision(runs, cls: str) -> None:
    results = [result["non_finite"][f"{cls}-rows"] for result in runs["ranks"]]
    assert all(r["kept_plain"] for r in results)
    assert any(r["fallback"] for r in results)
    # the same directions on both ranks (K-FAC comm-opt: each rank solves with the broadcast
    # decomposition, whose products may round differently: 1e-12, not bitwise)
    assert rel_err(results[0]["grads"], results[1]["grads"]) < 1e-12


@pytest.mark.parametrize("cls", ["CGFAC", "KFAC"])
def test_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(runs, cls: str) -> None:
    for result in runs["ranks"]:
        r = result["non_finite"][f"{cls}-grad"]
        assert r["skipped"] == 1 and r["steps"] == 1 and r["zeroed"], r


def test_bad_distributed_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="comm"):
        cgfac.CGFAC(sw.net(), comm="broadcast")
    with pytest.raises(ValueError, match="collective_timeout"):
        cgfac.KFAC(sw.net(), collective_timeout=-1.0)
    with pytest.raises(TypeError, match="targets"):
        pre = cgfac.CGFAC(sw.net(), fisher="true")
        pre.sample_fisher(torch.zeros(2, 4, requires_grad=True), "cross_entropy", targets=[0, 1])
