"""A rank that dies, raises or hangs never leaves the others waiting; restarts resume exactly.

Each test launches 2 gloo processes (``fault_worker.py``). The fault tests start the ranks
directly, without torchrun's agent (which would stop the survivors itself, as on one node but
not across nodes), so what ends the surviving rank is cgfac's collective error and the process
group's timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fault_worker as fw
import pytest
import torch

WORKER = Path(__file__).with_name("fault_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1",
       "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
       "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(WORKER.parent)) if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["kill", "raise", "hang"])
def test_a_failed_rank_makes_the_other_exit_with_an_error_within_the_timeout(tmp_path, mode: str) -> None:
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--out", str(tmp_path), "--mode", mode],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        out0, _ = procs[0].communicate(timeout=240)
        ended = time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    failed_at = float((tmp_path / "failed_at").read_text())
    assert procs[0].returncode != 0, out0[-3000:]
    assert not (tmp_path / "finished0").exists()
    assert "CollectiveError" in out0 and "cgfac: collective" in out0, out0[-3000:]
    # a killed peer is noticed at once (its sockets close); a hung one (or one still tearing
    # down after raising) after the collective timeout, and the process then ends when the
    # process group's own timeout releases the pending collective (30 s: a starved CPU's margin)
    bound = 30 if mode == "kill" else fw.PG_TIMEOUT + 30
    assert ended - failed_at < bound, (ended - failed_at, out0[-2000:])
    if mode == "hang":
        assert f"waited at most {fw.COLLECTIVE_TIMEOUT:g} s" in out0


@pytest.mark.timeout(420)
def test_restarts_resume_exactly_with_no_step_lost_or_repeated(tmp_path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", "--monitor-interval", "0.5", str(WORKER), "--out", str(tmp_path),
           "--mode", "restart"]
    # torchrun's agent shares its store with the workers across restarts, and a restarted gloo
    # rank can then read its peer's address of the previous attempt and fail to connect (torch
    # 2.13, "Connection refused" in connectFullMesh); a store per attempt avoids it
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    applied = [tuple(map(int, line.split())) for line in (tmp_path / "steps.log").read_text().split("\n") if line]
    # attempt 0 died after step 3's update (saved: 3 steps), attempt 1 during step 6's save (saved: 6)
    assert applied == [(0, s) for s in range(4)] + [(1, s) for s in range(3, 7)] + [(2, s) for s in range(6, 10)]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["attempt"] == 2
    model = fw.net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = fw.make(model)
    for step in range(fw.TOTAL):
        fw.step_once(model, model, opt, pre, step, 0, 1)
    for got, want in zip(final["params"], model.parameters()):
        assert float((got - want.detach()).abs().max() / want.detach().abs().max()) < 1e-9
