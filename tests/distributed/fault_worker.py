"""Workers for the fault tests (``tests/distributed/test_collectives.py``).

``--mode kill|raise|hang``: launched directly (no torchrun agent to stop the others), 2 gloo
ranks train with CG-FAC; at step ``FAIL_AT`` rank 1 is SIGKILLed, raises, or hangs between its
backward and ``pre.step()``, after writing the time to ``<out>/failed_at``. Rank 0 must exit
non-zero with cgfac's :class:`CollectiveError` within the process group's timeout.

``--mode restart``: launched by ``torchrun --max-restarts 2``; trains ``TOTAL`` steps, saving
``{model, opt, pre, step}`` atomically after every step, and resumes from the file at start.
Attempt 0: rank 1 is SIGKILLed after the optimizer step of step 3 (before its checkpoint);
attempt 1: rank 0 is SIGKILLed inside the save of step 6, between writing and renaming. Rank 0
logs ``attempt step`` for every applied step and writes the final parameters.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_worker import batch, net, shard
from torch.nn.parallel import DistributedDataParallel

import cgfac

FAIL_AT = 2
TOTAL = 10
PG_TIMEOUT = 15.0  # seconds: bounds how long a rank waits for a dead or hung peer
COLLECTIVE_TIMEOUT = 5.0


def make(model: torch.nn.Module) -> cgfac.CGFAC:
    return cgfac.CGFAC(model, solver="lowrank", curvature_window=2, collective_timeout=COLLECTIVE_TIMEOUT)


def step_once(trained, model, opt, pre, step: int, rank: int, world: int, before_pre=None) -> None:
    x, y = batch(400 + step)
    x, y = shard(x, rank, world), shard(y, rank, world)
    opt.zero_grad()
    F.cross_entropy(trained(x), y).backward()
    if before_pre is not None:
        before_pre()
    pre.step()
    opt.step()


def fail(mode: str, out: Path) -> None:
    (out / "failed_at").write_text(repr(time.time()))
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "raise":
        raise RuntimeError("injected failure on rank 1")
    time.sleep(600)  # hang


def faulty(mode: str, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = net()
    trained = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = make(trained)
    for step in range(FAIL_AT + 3):
        hook = (lambda: fail(mode, out)) if rank == 1 and step == FAIL_AT else None
        step_once(trained, model, opt, pre, step, rank, world, hook)
    (out / f"finished{rank}").write_text("rank went past the failure")


def restart(out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    ckpt = out / "ckpt.pt"
    model = net()
    trained = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = make(trained)
    start = 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        pre.load_state_dict(saved["pre"])
        start = saved["step"]
        assert pre.steps == start, (pre.steps, start)
    for step in range(start, TOTAL):
        step_once(trained, model, opt, pre, step, rank, world)
        if rank == 0:
            with open(out / "steps.log", "a") as f:
                f.write(f"{attempt} {step}\n")
        if attempt == 0 and rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # after the update, before its checkpoint
        state = {"model": model.state_dict(), "opt": opt.state_dict(),
                 "pre": cgfac.checkpoint.full_state_dict(pre), "step": step + 1}
        if rank == 0:
            if attempt == 1 and step == 6:
                os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies between write and rename
            cgfac.checkpoint.save_atomic(state, ckpt)
        dist.barrier()
    if rank == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "attempt": attempt},
                   out / "final.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["kill", "raise", "hang", "restart"], required=True)
    args = parser.parse_args()
    # restarts: a generous timeout, as the restarted ranks may start far apart on a busy machine
    timeout = 120.0 if args.mode == "restart" else PG_TIMEOUT
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    if args.mode == "restart":
        restart(Path(args.out))
    else:
        faulty(args.mode, Path(args.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
