"""Worker for the 2-process tests, launched by ``torchrun --standalone --nproc_per_node 2``.

Each rank first computes the single-process reference on the whole global batch (before
``init_process_group``), then joins gloo, trains its half under ``DistributedDataParallel`` and
checks that directions and parameters match the reference. Writes per-rank results as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cgfac

GLOBAL_BATCH = 8
PRECONDITIONERS = {
    "cgfac-kron-cg": lambda m: cgfac.CGFAC(m, solver="cg", cg_tol=1e-12, cg_max_iters=1000, kl_clip=None),
    "cgfac-kron-lowrank": lambda m: cgfac.CGFAC(m, solver="lowrank", kl_clip=None),
    "cgfac-kron-lowrank-gather": lambda m: cgfac.CGFAC(m, solver="lowrank", kl_clip=None, comm="gather-rows"),
    "cgfac-kron-cg-reduce": lambda m: cgfac.CGFAC(m, solver="cg", cg_tol=1e-12, cg_max_iters=1000, kl_clip=None,
                                                  comm="reduce-factors"),
    "cgfac-exact-cg": lambda m: cgfac.CGFAC(m, curvature="exact", solver="cg", cg_tol=1e-12,
                                            cg_max_iters=1000, kl_clip=None),
    "cgfac-exact-lowrank": lambda m: cgfac.CGFAC(m, curvature="exact", solver="lowrank", kl_clip=None),
    "kfac-comm-opt": lambda m: cgfac.KFAC(m, factor_decay=0.0, inv_update_steps=1, kl_clip=None),
    "kfac-mem-opt": lambda m: cgfac.KFAC(m, factor_decay=0.0, inv_update_steps=1, kl_clip=None,
                                         strategy="mem-opt"),
}
TRAINING = {
    # CG to convergence: a truncated solve is discontinuous in its inputs (the iteration count can
    # change with rounding-level differences between DDP's averaged gradient and the reference).
    "cgfac-auto": lambda m: cgfac.CGFAC(m, damping=1e-2, kl_clip=1e-2, lr=0.1, curvature_window=2,
                                        cg_tol=1e-11, cg_max_iters=1000),
    "kfac": lambda m: cgfac.KFAC(m, damping=1e-2, kl_clip=1e-2, lr=0.1, inv_update_steps=2),
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 8), nn.Tanh(),
                         nn.Linear(8, 4)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 1, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def directions(make, rank: int | None, world: int) -> list[torch.Tensor]:
    model = net()
    trained = DistributedDataParallel(model) if rank is not None else model
    pre = make(trained)
    x, y = batch(0)
    if rank is not None:
        x, y = shard(x, rank, world), shard(y, rank, world)
    F.cross_entropy(trained(x), y).backward()
    pre.step()
    routes = {name: st.get("comm") for name, st in pre.layer_stats().items()}
    return [p.grad.clone() for p in model.parameters()], pre.dist.bytes_sent, routes


def train(make, rank: int | None, world: int, steps: int = 6) -> tuple[list[torch.Tensor], list[int]]:
    model = net()
    trained = DistributedDataParallel(model) if rank is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = make(trained)
    sent = []
    for step in range(steps):
        x, y = batch(100 + step)
        if rank is not None:
            x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        before = pre.dist.bytes_sent
        pre.step()
        sent.append(pre.dist.bytes_sent - before)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises after joining")
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    ref_dirs = {k: directions(make, None, 1)[0] for k, make in PRECONDITIONERS.items()}
    ref_train = {k: train(make, None, 1)[0] for k, make in TRAINING.items()}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if rank == args.fail_rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    result = {"rank": rank, "world": world, "directions": {}, "training": {}}
    for kind, make in PRECONDITIONERS.items():
        got, sent, routes = directions(make, rank, world)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref_dirs[kind]))
        result["directions"][kind] = {"max_rel_err": err, "bytes_sent": sent, "comm": routes}
    for kind, make in TRAINING.items():
        got, sent = train(make, rank, world)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref_train[kind]))
        result["training"][kind] = {"max_rel_err": err, "bytes_sent_per_step": sent}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Both ranks past their last collective before either tears gloo down: without it, rank 0
    # once aborted in teardown ("terminate called without an active exception", SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
