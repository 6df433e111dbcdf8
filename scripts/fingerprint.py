"""Fingerprint of what the preconditioners and optimizers compute, for refactors that must change nothing.

``python scripts/fingerprint.py record OUT.pt`` runs a fixed set of configurations (float64, fixed
seeds, a few steps each, including a step with a non-finite gradient and one with non-finite rows)
and saves, per configuration and step, every parameter's ``.grad`` after the preconditioner (or the
parameters after the optimizer's step), ``layer_stats()``, the counters and the ``state_dict()``.
With ``--ranks 2`` it also runs the data-parallel configurations on two gloo ranks (``torchrun``)
and saves each rank's. ``python scripts/fingerprint.py compare A.pt B.pt`` says whether two records
are bit-identical, and where they differ first.

Run ``record`` on the commit before a refactor and after it (``PYTHONPATH`` selects the code).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cgfac
import cgfac.optim
from cgfac.solvers.cost import CostConstants

STEPS = 4
BAD_GRAD_STEP = 2  # a NaN in one gradient: the step is skipped


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


def fixed_costs(pre: Any) -> Any:
    """``solver="auto"`` with fixed cost constants (calibrating them is a timing: not repeatable)."""
    pre.cost_constants = CostConstants(8.0, 4.0, 3.0, 1.5, 2e4, 1e5)
    return pre


PRECONDITIONERS: dict[str, Callable[[nn.Module], cgfac.Preconditioner]] = {
    "cgfac-cg": lambda m: cgfac.CGFAC(m, solver="cg", kl_clip=1e-2, lr=0.1),
    "cgfac-lowrank": lambda m: cgfac.CGFAC(m, solver="lowrank", kl_clip=None, curvature_window=2),
    "cgfac-eigen": lambda m: cgfac.CGFAC(m, solver="eigen", kl_clip=1e-2),
    "cgfac-auto-relative": lambda m: fixed_costs(cgfac.CGFAC(m, damping=1e-2, damping_scale="relative")),
    "cgfac-exact": lambda m: cgfac.CGFAC(m, curvature="exact", solver="cg", kl_clip=None),
    "cgfac-graft": lambda m: fixed_costs(cgfac.CGFAC(m, graft="rmsprop", kl_clip=1e-2)),
    "kfac": lambda m: cgfac.KFAC(m, inv_update_steps=2, kl_clip=1e-2),
    "kfac-graft": lambda m: cgfac.KFAC(m, graft="rmsprop", kl_clip=None, damping_scale="relative"),
}
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "optim-kfac": lambda m: cgfac.optim.KFAC(m, loss_type="cross_entropy", damping_interval=2),
    "optim-cgfac": lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", damping_interval=2, weight_decay=1e-3,
                                               solver="cg"),
    "optim-cgfac-true": lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", fisher="true", adaptive="lr",
                                                    solver="lowrank"),
    "optim-cgfac-subset": lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy", fisher="true", weight_decay=1e-3,
                                                      curvature_samples=8, quad_samples=8, damping_interval=1,
                                                      solver="lowrank"),
    "optim-kfac-loss-fn": lambda m: cgfac.optim.KFAC(m, loss_type="cross_entropy", damping_interval=1,
                                                     loss_fn=lambda out, a, k: F.cross_entropy(out, TARGETS[0])),
    "tkfac-ortho": lambda m: cgfac.optim.TransformerKFAC(m, lr=0.01),
}
TARGETS: list[torch.Tensor] = []  # the current batch's targets, for loss_fn


def mixed_net() -> nn.Module:
    """An embedding (diag-kron block), a normalisation layer (feature blocks) and linear layers."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 8), nn.Tanh(), nn.Flatten(1),
                         nn.Linear(24, 4)).double()


def mixed_batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + step)
    return torch.randint(0, 10, (n, 3), generator=gen), torch.randint(0, 4, (n,), generator=gen)


# K-FAC on every block type and factor form, both damping forms and strategies; the run is
# resumed from a checkpoint into a fresh preconditioner after RELOAD_STEP (the decompositions rebuilt).
KFAC_MIXED: dict[str, Callable[[nn.Module], cgfac.Preconditioner]] = {
    "kfac-mixed-forms": lambda m: cgfac.KFAC(m, inv_update_steps=2, factor_form={"2": "diag-in", "5": "diag-out"},
                                             damping_form="factored", kl_clip=1e-2),
    "kfac-mixed-diag-mem-opt": lambda m: cgfac.KFAC(m, inv_update_steps=3, factor_form={"2|5": "diag"},
                                                    strategy="mem-opt", factor_warmup="mean", kl_clip=None),
    "kfac-mixed-dense": lambda m: cgfac.KFAC(m, inv_update_steps=2, factor_form="dense", kl_clip=None,
                                             damping_scale="relative"),
}
RELOAD_STEP = 1


def snapshot(obj: Any) -> Any:
    """A detached copy of tensors inside dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def run_preconditioner(make: Callable[[nn.Module], Any], steps: int = STEPS, *, rank: int = 0,
                       world: int = 1, model_fn: Callable[[], nn.Module] = net,
                       batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = batch,
                       reload_step: int | None = None) -> list[dict[str, Any]]:
    """``steps`` steps of a preconditioner on ``model_fn()`` (under DDP, on this rank's share of each
    batch, when ``world > 1``); the last rank's gradient turns NaN at :data:`BAD_GRAD_STEP`; with
    ``reload_step``, the preconditioner is rebuilt from its ``state_dict`` after that step."""
    from torch.nn.parallel import DistributedDataParallel

    model = model_fn()
    module = DistributedDataParallel(model) if world > 1 else model
    pre = make(module)
    out = []
    for step in range(steps):
        x, y = batch_fn(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        model.zero_grad()
        F.cross_entropy(module(x), y).backward()
        if step == BAD_GRAD_STEP and rank == world - 1:
            next(model.parameters()).grad[0, 0] = math.nan
        pre.step()
        out.append({"grads": [snapshot(p.grad) for p in model.parameters()], "stats": snapshot(pre.layer_stats()),
                    "counters": (pre.steps, pre.fallbacks, pre.skipped_steps), "state": snapshot(pre.state_dict())})
        if step == reload_step:
            state = pre.state_dict()
            pre.remove()
            pre = make(module)
            pre.load_state_dict(state)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
    return out


def run_kfac_mixed(make: Callable[[nn.Module], Any], steps: int = STEPS, *, rank: int = 0,
                   world: int = 1) -> list[dict[str, Any]]:
    """:func:`run_preconditioner` on :func:`mixed_net`, with a checkpoint round trip after :data:`RELOAD_STEP`."""
    return run_preconditioner(make, steps, rank=rank, world=world, model_fn=mixed_net, batch_fn=mixed_batch,
                              reload_step=RELOAD_STEP)


def run_optimizer(make: Callable[[nn.Module], Any], steps: int = STEPS) -> list[dict[str, Any]]:
    model = net()
    opt = make(model)
    out = []
    for step in range(steps):
        x, y = batch(step)
        TARGETS[:] = [y]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        out.append({"params": [snapshot(p) for p in model.parameters()], "state": snapshot(opt.state_dict())})
    return out


def record_single() -> dict[str, Any]:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in PRECONDITIONERS.items():
            result[name] = run_preconditioner(make)
        for name, make in KFAC_MIXED.items():
            result[name] = run_kfac_mixed(make)
        for name, make in OPTIMIZERS.items():
            result[name] = run_optimizer(make)
    return result


def worker(out: Path) -> None:
    """One gloo rank: every preconditioner on this rank's half of each batch under DDP."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {name: run_preconditioner(make, rank=rank, world=world) for name, make in PRECONDITIONERS.items()}
        result.update({name: run_kfac_mixed(make, rank=rank, world=world) for name, make in KFAC_MIXED.items()})
    torch.save(result, out.with_suffix(f".rank{rank}.pt"))
    dist.destroy_process_group()


def record_ranks(ranks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "fp"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               __file__, "worker", str(base)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return {f"rank{r}": torch.load(base.with_suffix(f".rank{r}.pt"), weights_only=False) for r in range(ranks)}


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor against {type(b if isinstance(a, torch.Tensor) else a).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: {a.dtype}{tuple(a.shape)} against {b.dtype}{tuple(b.shape)}"
        same = torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() \
            else torch.equal(a, b)
        return None if same else f"{where}: max |difference| {float((a - b).abs().nan_to_num().max()):.3g}"
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} differ" if set(a) != set(b) \
                else f"{where}: key order differs"
        for k in a:
            d = first_difference(a[k], b[k], f"{where}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} against {len(b)}"
        for k, (u, v) in enumerate(zip(a, b)):
            d = first_difference(u, v, f"{where}[{k}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} against {b!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--ranks", type=int, default=2, help="gloo ranks of the data-parallel part (0: none)")
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    wrk = sub.add_parser("worker")
    wrk.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "worker":
        worker(args.out)
        return 0
    if args.command == "record":
        result = {"single": record_single()}
        if args.ranks > 1:
            result["ranks"] = record_ranks(args.ranks)
        torch.save(result, args.out)
        print(f"recorded {sum(len(v) for v in result.values())} groups into {args.out}")
        return 0
    a, b = torch.load(args.a, weights_only=False), torch.load(args.b, weights_only=False)
    diff = first_difference(a, b)
    print("bit-identical" if diff is None else f"differs at {diff}")
    return 0 if diff is None else 1


if __name__ == "__main__":
    sys.exit(main())
