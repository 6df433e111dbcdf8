"""FSDP2 (``fully_shard``) on 2 gloo CPU processes: sharded gradients are preconditioned as the
unsharded single-process run on the global batch (float64)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsdp_worker as fw
import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1",
       "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
       **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", list(fw.PRECONDITIONERS))
def test_fsdp2_sharded_run_matches_the_unsharded_single_process(ranks, kind: str) -> None:
    want = fw.train(kind, 0, 1)
    for r, result in enumerate(ranks):
        got = result[kind]
        assert got["sharded"]
        for step, (g, w) in enumerate(zip(got["directions"], want["directions"])):
            assert rel_err(g, w) < 1e-9, (kind, r, step, rel_err(g, w))
        assert rel_err(got["params"], want["params"]) < 1e-9


def test_fsdp2_shards_are_uneven_and_local(ranks) -> None:
    """Conv (3 output channels) shards as 2 + 1 rows, Linear(48, 8) as 4 + 4: each rank wrote only its rows."""
    rows = [result["kfac-comm-opt"]["local_rows"] for result in ranks]
    assert rows[0][:2] == [2, 2] and rows[1][:2] == [1, 1]
    assert rows[0][2] == rows[1][2] == 4
