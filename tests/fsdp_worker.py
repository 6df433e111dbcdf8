"""Worker for the FSDP2 test (``tests/test_fsdp.py``): 2 gloo CPU processes, parameters and
gradients sharded by ``torch.distributed.fsdp.fully_shard``; each rank trains on its shard of the
global batch and saves the full directions and parameters of every step to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_worker import batch, net, shard
from torch import nn

import cgfac

STEPS = 4
PRECONDITIONERS: dict[str, Callable[[nn.Module], cgfac.Preconditioner]] = {
    "cgfac-lowrank": lambda m: cgfac.CGFAC(m, solver="lowrank", curvature_window=2, damping=1e-2, kl_clip=1e-2),
    "cgfac-exact-cg": lambda m: cgfac.CGFAC(m, curvature="exact", solver="cg", cg_tol=1e-13, cg_max_iters=2000,
                                            damping=1e-2, kl_clip=None),
    "kfac-comm-opt": lambda m: cgfac.KFAC(m, damping=1e-2, inv_update_steps=2, kl_clip=None),
    "kfac-mem-opt": lambda m: cgfac.KFAC(m, damping=1e-2, inv_update_steps=2, kl_clip=None, strategy="mem-opt"),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return cgfac.sharded.full(t).detach().clone()


def train(kind: str, rank: int, world: int, mesh=None) -> dict:
    """``STEPS`` steps; with ``mesh`` the model is sharded by FSDP2 (every layer and the root)."""
    model = net()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = PRECONDITIONERS[kind](model)  # after fully_shard: it reads the sharded parameters
    dirs = []
    for step in range(STEPS):
        x, y = batch(500 + step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        dirs.append([full(p.grad) for p in model.parameters()])
        opt.step()
    return {"directions": dirs, "params": [full(p) for p in model.parameters()],
            "sharded": all(cgfac.sharded.is_sharded(p) for p in model.parameters()),
            "local_rows": [cgfac.sharded.local(p).shape[0] for p in model.parameters()]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    result = {kind: train(kind, rank, world, mesh) for kind in PRECONDITIONERS}
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
