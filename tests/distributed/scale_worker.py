"""Worker for the world-size, true-Fisher and non-finite tests (``tests/distributed/test_scale.py``).

Launched by ``torchrun --standalone --nproc_per_node 2``. Every check runs on gloo in float64 on
the model and batches of ``dist_worker``; results are written by each rank to
``<out>/rank<r>.pt`` (directions, parameters, flags) for the test to compare against
single-process references it computes itself.

* ``resume``: load a checkpoint saved by one process (``--load``) and run ``RESUME_STEPS`` more
  steps on 2 ranks; then train ``SAVE_AT`` steps from scratch on 2 ranks and save
  :func:`cgfac.checkpoint.full_state_dict` atomically (``--save``), for one process to resume.
* ``true_fisher``: DDP with ``fisher="true"``, each rank sampling its own targets.
* ``non_finite``: non-finite values on rank 1 only (captured rows; ``.grad``).
"""

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
from torch.nn.parallel import DistributedDataParallel

import cgfac

SAVE_AT = 4  # steps before the checkpoint
RESUME_STEPS = 3  # steps after it, whose directions are compared
RESUMABLE: dict[str, Callable[[nn.Module], cgfac.Preconditioner]] = {
    "cgfac-cg-window": lambda m: cgfac.CGFAC(m, solver="cg", curvature_window=3, cg_tol=1e-13,
                                             cg_max_iters=2000, kl_clip=None),
    "cgfac-exact-lowrank": lambda m: cgfac.CGFAC(m, curvature="exact", solver="lowrank", curvature_window=2,
                                                 kl_clip=None),
    "kfac-comm-opt": lambda m: cgfac.KFAC(m, damping=1e-2, factor_decay=0.9, inv_update_steps=3, kl_clip=None),
    "kfac-mem-opt": lambda m: cgfac.KFAC(m, damping=1e-2, factor_decay=0.9, inv_update_steps=3, kl_clip=None,
                                        strategy="mem-opt"),
}
TRUE_FISHER: dict[str, Callable[[nn.Module], cgfac.Preconditioner]] = {
    "cgfac": lambda m: cgfac.CGFAC(m, fisher="true", solver="lowrank", curvature_window=2, kl_clip=None),
    "kfac": lambda m: cgfac.KFAC(m, fisher="true", factor_decay=0.9, inv_update_steps=2, kl_clip=None),
}
TRUE_FISHER_STEPS = 4


def setup(kind: str, world: int, table: dict) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer,
                                                       cgfac.Preconditioner]:
    """The model, what is trained (DDP across processes), SGD and the preconditioner."""
    model = net()
    trained = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, trained, opt, table[kind](trained)


def run_steps(trained: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, pre: cgfac.Preconditioner,
              start: int, stop: int, rank: int, world: int) -> list[list[torch.Tensor]]:
    """Train steps ``start..stop-1`` on this rank's shard; the directions of each step."""
    dirs = []
    for step in range(start, stop):
        x, y = batch(100 + step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        pre.step()
        dirs.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return dirs


def checkpoint(model: nn.Module, opt: torch.optim.Optimizer, pre: cgfac.Preconditioner, step: int) -> dict | None:
    state = cgfac.checkpoint.full_state_dict(pre)
    if state is None:
        return None
    return {"model": model.state_dict(), "opt": opt.state_dict(), "pre": state, "step": step}


def resume(load: str, save: str, rank: int, world: int) -> dict:
    out: dict = {}
    saved = torch.load(load, weights_only=True)
    for kind in RESUMABLE:
        model, trained, opt, pre = setup(kind, world, RESUMABLE)
        model.load_state_dict(saved[kind]["model"])
        opt.load_state_dict(saved[kind]["opt"])
        pre.load_state_dict(saved[kind]["pre"])
        step = saved[kind]["step"]
        out[kind] = run_steps(trained, model, opt, pre, step, step + RESUME_STEPS, rank, world)
    states = {}
    for kind in RESUMABLE:
        model, trained, opt, pre = setup(kind, world, RESUMABLE)
        run_steps(trained, model, opt, pre, 0, SAVE_AT, rank, world)
        states[kind] = checkpoint(model, opt, pre, SAVE_AT)
    if rank == 0:
        cgfac.checkpoint.save_atomic(states, save)
    return out


def reference_targets(outputs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """What the ranks sample: rank ``r`` draws its shard's targets from its own stream."""
    return torch.cat([cgfac.losses.sample_targets(o, "cross_entropy", g)
                      for o, g in zip(outputs.chunk(len(gens)), gens)])


def rank_generators(world: int, seed: int = 0) -> list[torch.Generator]:
    seeds = []
    for r in range(world):
        seeds.append(cgfac.capture.capture.rank_seed(torch.Generator().manual_seed(seed), r, world))
    return [torch.Generator().manual_seed(s) for s in seeds]


def true_fisher(kind: str, rank: int | None, world: int) -> dict:
    """``TRUE_FISHER_STEPS`` training steps with sampled targets. ``rank=None``: one process on
    the global batch, replaying the targets every rank of ``world`` draws."""
    model, trained, opt, pre = setup(kind, world if rank is not None else 1, TRUE_FISHER)
    gens = rank_generators(world) if rank is None else None
    dirs, grads_untouched = [], True
    for step in range(TRUE_FISHER_STEPS):
        x, y = batch(200 + step)
        if rank is not None:
            x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad(set_to_none=True)
        out = trained(x)
        if gens is None:
            pre.sample_fisher(out, "cross_entropy")
        else:
            pre.sample_fisher(out, "cross_entropy", targets=reference_targets(out, gens))
        grads_untouched &= all(p.grad is None for p in model.parameters())
        F.cross_entropy(out, y).backward()
        pre.step()
        dirs.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    seed = pre.sampling_generator("cpu").initial_seed()
    return {"directions": dirs, "params": [p.detach().clone() for p in model.parameters()],
            "grads_untouched": grads_untouched, "seed": seed}


def non_finite(rank: int, world: int) -> dict:
    out = {}
    for cls in ("CGFAC", "KFAC"):
        model = net()
        trained = DistributedDataParallel(model)
        pre = getattr(cgfac, cls)(trained, kl_clip=None)
        x, y = batch(300)
        x, y = shard(x, rank, world), shard(y, rank, world)
        # (a) non-finite captured rows of layer "3" on rank 1 only
        F.cross_entropy(trained(x), y).backward()
        plain = model[3].weight.grad.clone()
        if rank == 1:
            pre.layers["3"].chunks[0].a[0, 0] = float("nan")
        pre.step()
        out[f"{cls}-rows"] = {
            "fallback": "fallback" in pre.stats.get("3", {}) or not pre.dist.owns("3"),
            "kept_plain": bool(torch.equal(model[3].weight.grad, plain)),
            "grads": [p.grad.clone() for p in model.parameters()],
        }
        # (b) a non-finite .grad on rank 1 only (as with no_sync accumulation or sharded gradients)
        trained.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        if rank == 1:
            model[5].weight.grad[0, 0] = float("inf")
        pre.step()
        out[f"{cls}-grad"] = {"skipped": pre.skipped_steps, "steps": pre.steps,
                              "zeroed": all(bool((p.grad == 0).all()) for p in model.parameters())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--load", required=True, help="checkpoint saved by one process")
    parser.add_argument("--save", required=True, help="where rank 0 saves the 2-process checkpoint")
    args = parser.parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    result = {"resume": resume(args.load, args.save, rank, world),
              "true_fisher": {k: true_fisher(k, rank, world) for k in TRUE_FISHER},
              "non_finite": non_finite(rank, world)}
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
