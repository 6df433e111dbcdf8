"""Worker for the FSDP2 tests (``tests/distributed/test_sharded.py``): 2 gloo CPU processes, parameters and
gradients sharded by ``torch.distributed.fsdp.fully_shard``; each rank trains on its shard of the
global batch and saves, per run, the full directions and parameters of every step, what
``pre.step()`` communicated (``DTensor.full_tensor`` calls and the numbers they and the
all-to-alls brought to this rank) and the owners, to ``<out>/rank<r>.pt``.

The same functions with ``mesh=None`` are the unsharded single-process reference on the global
batch (``train``, ``true_fisher``, ``optimizer``), run by the test itself."""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_worker import batch, net, shard
from scale_worker import rank_generators, reference_targets
from torch import nn

import cgfac

STEPS = 4
PRECONDITIONERS: dict[str, Callable[..., cgfac.Preconditioner]] = {
    "cgfac-lowrank": lambda m, **k: cgfac.CGFAC(m, solver="lowrank", curvature_window=2, damping=1e-2, kl_clip=1e-2,
                                                **k),
    "cgfac-exact-cg": lambda m, **k: cgfac.CGFAC(m, curvature="exact", solver="cg", cg_tol=1e-13, cg_max_iters=2000,
                                                 damping=1e-2, kl_clip=None, **k),
    "kfac-comm-opt": lambda m, **k: cgfac.KFAC(m, damping=1e-2, inv_update_steps=2, kl_clip=None, **k),
    "kfac-mem-opt": lambda m, **k: cgfac.KFAC(m, damping=1e-2, inv_update_steps=2, kl_clip=1e-2,
                                              strategy="mem-opt", **k),
    # grafted: the owner rescales the direction with the second moment it alone keeps
    "cgfac-graft": lambda m, **k: cgfac.CGFAC(m, solver="lowrank", damping=1e-2, kl_clip=None, graft="rmsprop",
                                              **k),
}
TRUE_FISHER = {
    "cgfac": lambda m: cgfac.CGFAC(m, fisher="true", solver="lowrank", curvature_window=2, kl_clip=None),
    "kfac": lambda m: cgfac.KFAC(m, fisher="true", factor_decay=0.9, inv_update_steps=2, kl_clip=None),
}


def uneven_net() -> nn.Module:
    """Rows of 3 (conv: 2 + 1 on 2 ranks), 5 (3 + 2), 1 (fewer than the ranks: 1 + 0) and 4."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(),
                         nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 4)).double()


class SeqNet(nn.Module):
    """Embedding (11 rows: its shards are columns of the layer matrix), attention with the packed
    in-projection (18 rows: k_proj's rows 6..12 straddle the two shards), LayerNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(11, 6)
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.out(h.mean(1))


def seq_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(700 + step)
    return torch.randint(0, 11, (8, 5), generator=gen), torch.randint(0, 4, (8,), generator=gen)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, torch.Tensor]]]] = {
    "net": (net, lambda step: batch(500 + step)),
    "uneven": (uneven_net, lambda step: batch(600 + step)),
    "seq": (lambda: SeqNet().double(), seq_batch),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return cgfac.distributed.sharded.full(t).detach().clone()


def shard_model(model: nn.Module, mesh: Any, placement: Callable | None = None) -> None:
    """``fully_shard`` every module with parameters of its own (not attention's out_proj, which the
    attention module's unit holds), then the root. ``placement``: FSDP2's ``shard_placement_fn``
    for the first Linear (to make one layer's shards unusable by the owner scheme)."""
    from torch.distributed.fsdp import fully_shard

    first_linear = True
    for module in model.modules():
        if module is model or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            kwargs = {}
            if placement is not None and isinstance(module, nn.Linear) and first_linear:
                kwargs["shard_placement_fn"] = placement
                first_linear = False
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh)


# --- what pre.step() communicates (patched into torch in main()) ---------------------------------
COUNT = {"full_tensor": 0, "full_numbers": 0, "a2a_numbers": 0}


def _patch_counters(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    full_tensor, all_to_all = DTensor.full_tensor, dist.all_to_all_single

    def counted_full_tensor(self, *args, **kwargs):
        out = full_tensor(self, *args, **kwargs)
        COUNT["full_tensor"] += 1
        COUNT["full_numbers"] += out.numel() - self.to_local().numel()
        return out

    def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        COUNT["a2a_numbers"] += output.numel() - output_split_sizes[rank]
        return all_to_all(output, input, output_split_sizes, input_split_sizes, **kwargs)

    DTensor.full_tensor = counted_full_tensor
    dist.all_to_all_single = counted_all_to_all


def counted_step(step: Callable[[], Any]) -> dict[str, int]:
    for k in COUNT:
        COUNT[k] = 0
    step()
    return dict(COUNT)


# --- runs ------------------------------------------------------------------------------------------
def train(kind: str, rank: int, world: int, mesh=None, *, model_name: str = "net", steps: int = STEPS,
          placement: Callable | None = None, **kwargs: Any) -> dict:
    """``steps`` steps with SGD; with ``mesh`` the model is sharded by FSDP2 (every layer and the root)."""
    make, get_batch = MODELS[model_name]
    model = make()
    if mesh is not None:
        shard_model(model, mesh, placement)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = PRECONDITIONERS[kind](model, **kwargs)  # after fully_shard: it reads the sharded parameters
    dirs, comm, sent = [], [], []
    for step in range(steps):
        x, y = get_batch(step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = pre.dist.bytes_sent
        comm.append(counted_step(pre.step))
        sent.append(pre.dist.bytes_sent - before)
        dirs.append([full(p.grad) for p in model.parameters()])
        opt.step()
    stats = pre.layer_stats()
    return {"directions": dirs, "params": [full(p) for p in model.parameters()],
            "sharded": all(cgfac.distributed.sharded.is_sharded(p) for p in model.parameters()),
            "local_rows": [cgfac.distributed.sharded.local(p).shape[0] for p in model.parameters()],
            "routes": {name: st.get("sharded", "") for name, st in stats.items()},
            "fallbacks": pre.fallbacks, "owners": dict(pre.dist.owners), "comm": comm, "bytes_sent": sent,
            "units": {name: [(tuple(p.shape), (sl.start, sl.stop) if sl is not None else None)
                             for p, sl in h.grad_parts()] for name, h in pre.layers.items()},
            "state": cgfac.checkpoint.full_state_dict(pre, dst=None)}


def true_fisher(kind: str, rank: int, world: int, mesh=None) -> dict:
    """``STEPS`` steps with targets sampled by ``sample_fisher`` (each rank its own stream); with
    ``mesh=None`` one process on the global batch replays the targets every rank of ``world`` draws."""
    model = net()
    if mesh is not None:
        shard_model(model, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = TRUE_FISHER[kind](model)
    gens = rank_generators(world) if mesh is None else []
    dirs = []
    for step in range(STEPS):
        x, y = batch(200 + step)
        if mesh is not None:
            x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if mesh is not None:
            pre.sample_fisher(out, "cross_entropy")
        else:
            pre.sample_fisher(out, "cross_entropy", targets=reference_targets(out, gens))
        F.cross_entropy(out, y).backward()
        pre.step()
        dirs.append([full(p.grad) for p in model.parameters()])
        opt.step()
    return {"directions": dirs, "params": [full(p) for p in model.parameters()], "fallbacks": pre.fallbacks}


def optimizer(rank: int, world: int, mesh=None) -> dict:
    """``cgfac.optim.KFAC`` without the quadratic model (``adaptive="none"``: SGD with momentum on
    the preconditioned direction), ``STEPS`` steps."""
    model = net()
    if mesh is not None:
        shard_model(model, mesh)
    opt = cgfac.optim.KFAC(model, damping=1e-2, inv_update_steps=2, adaptive="none", adapt_damping=False, lr=0.1,
                           momentum=0.9)
    dirs = []
    for step in range(STEPS):
        x, y = batch(800 + step)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        dirs.append([full(p.grad) for p in model.parameters()])
    return {"directions": dirs, "params": [full(p) for p in model.parameters()]}


def adaptive_error(mesh) -> str:
    """What ``cgfac.optim.KFAC`` with its quadratic model (the default ``adaptive``) says under FSDP2."""
    model = net()
    shard_model(model, mesh)
    try:
        cgfac.optim.KFAC(model, loss_type="cross_entropy")
    except ValueError as err:
        return str(err)
    return ""


def columns(p: torch.Tensor) -> Any:
    """FSDP2's ``shard_placement_fn``: a weight matrix by columns (``Shard(1)``), a bias by rows."""
    from torch.distributed.tensor import Shard

    return Shard(1) if p.ndim == 2 else None


def owner_mode_error(rank: int, world: int, mesh) -> str:
    """``sharded_grads="owner"`` with a layer sharded by columns (``Shard(1)``)."""
    try:
        train("kfac-comm-opt", rank, world, mesh, steps=1, placement=columns, sharded_grads="owner")
    except ValueError as err:
        return str(err)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    _patch_counters(rank)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, Any] = {
        "owner": {kind: train(kind, rank, world, mesh) for kind in PRECONDITIONERS},
        "all-gather": {kind: train(kind, rank, world, mesh, sharded_grads="all-gather")
                       for kind in ("cgfac-lowrank", "kfac-mem-opt")},
        "uneven": {kind: train(kind, rank, world, mesh, model_name="uneven")
                   for kind in ("cgfac-lowrank", "kfac-comm-opt")},
        "seq": {kind: train(kind, rank, world, mesh, model_name="seq", steps=2)
                for kind in ("cgfac-lowrank", "kfac-mem-opt")},
        "columns": train("kfac-comm-opt", rank, world, mesh, steps=2, placement=columns),
        "owner_error": owner_mode_error(rank, world, mesh),
        "true_fisher": {kind: true_fisher(kind, rank, world, mesh) for kind in TRUE_FISHER},
        "optim": optimizer(rank, world, mesh),
        "adaptive_error": adaptive_error(mesh),
    }
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
