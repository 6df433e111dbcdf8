"""Two processes on gloo over 127.0.0.1, launched by torchrun from the test, with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(out: Path, *extra: str, timeout: int = 240, worker: Path = WORKER) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), "--out", str(out), *extra]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1",
           "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_directions_equal_single_process_on_global_batch(two_ranks) -> None:
    for result in two_ranks:
        for kind, r in result["directions"].items():
            assert r["max_rel_err"] < 1e-9, (result["rank"], kind, r)


def test_training_matches_single_process(two_ranks) -> None:
    for result in two_ranks:
        for kind, r in result["training"].items():
            assert r["max_rel_err"] < 1e-8, (result["rank"], kind, r)


def test_communication_is_counted(two_ranks) -> None:
    """Every method sends something; CG-FAC's owners only receive rows, so ranks differ."""
    for result in two_ranks:
        assert all(r["bytes_sent"] > 0 for r in result["directions"].values())
    cg = [r["directions"]["cgfac-kron-lowrank"]["bytes_sent"] for r in two_ranks]
    assert cg[0] != cg[1]


def test_cgfac_chooses_the_route_with_fewer_bytes_per_layer(two_ranks) -> None:
    """4 samples per rank: the conv layer (16 patch rows per sample, 10 × 3) reduces its factors
    (100 + 9 numbers against ½ · 64 · 13), the linear layers gather their 4 rows; forced routes
    are taken as asked, and every route gives the single-process direction (checked above)."""
    for result in two_ranks:
        d = result["directions"]
        assert d["cgfac-kron-lowrank"]["comm"] == {"0": "reduce-factors", "3": "gather-rows", "5": "gather-rows"}
        assert set(d["cgfac-kron-lowrank-gather"]["comm"].values()) == {"gather-rows"}
        assert set(d["cgfac-kron-cg-reduce"]["comm"].values()) == {"reduce-factors"}
        assert set(d["cgfac-exact-lowrank"]["comm"].values()) == {"gather-rows"}  # no factors to reduce


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path) -> None:
    proc = torchrun(tmp_path, "--fail-rank", "1", timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr


def test_byte_formulas_match_the_counted_bytes(two_ranks) -> None:
    """``cgfac_bench.comm``'s formulas reproduce what each rank counted (float64, 4 samples each)."""
    import dist_worker

    from cgfac_bench.comm import layer_shapes, per_rank_bytes

    shapes = layer_shapes(dist_worker.net().float(), (1, 4, 4))
    local = dist_worker.GLOBAL_BATCH // 2
    for method, kind, kw in [("cgfac", "cgfac-kron-lowrank", {}),
                             ("kfac-comm-opt", "kfac-comm-opt", {"inv_update_steps": 1}),
                             ("kfac-mem-opt", "kfac-mem-opt", {"inv_update_steps": 1})]:
        want = per_rank_bytes(shapes, local, 2, method, number_bytes=8, **kw)
        got = [r["directions"][kind]["bytes_sent"] for r in two_ranks]
        assert got == want, (method, got, want)
