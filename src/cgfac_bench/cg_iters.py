"""CG iterations to tolerance along a real training run, warm-started against cold-started.

The paper's claim 3: warm-started CG needs only 10–20 iterations per layer and step. This trains
``--task`` (default the autoencoder) for ``--steps`` steps (default 100) with
``cgfac.CGFAC(curvature="kron", solver="cg", warm_start=True, jacobi=True)`` in front of SGD with
momentum 0.9, the task's damping, KL clip and Fisher and the smaller second-order learning rate
of the grid (see :mod:`cgfac_bench.train`), CG tolerance ``--cg-tol`` (relative residual,
default 1e-3) and an iteration cap ``--cg-max-iters`` (default 200, well above the library's 50,
so that counts are rarely capped). At every step and layer it records:

* warm: the iterations the preconditioner's own CG spent, started from the layer's previous
  solution (``pre.layer_stats()``), and its products (one more, for the warm start's residual);
* cold: the iterations the same CG needs from zero on the same system, the same curvature rows
  (the layer state's window, this batch), damping, tolerance, Jacobi preconditioner and cap,
  solved on the side by the preconditioner's own solver (:meth:`cgfac.solvers.CGSolver.run`) on a
  copy of ``∇W`` taken before ``pre.step()``. Its solution is
  discarded, so the training trajectory is exactly the warm-started one.

Summaries (median, 90th percentile, maximum, and how often the cap was hit without reaching the
tolerance) leave out step 0, where no previous solution exists and both starts are cold. The
count depends strongly on the damping: the default autoencoder damping (λ = 1) makes the system
well conditioned; ``--damping`` explores smaller values. Writes
``results.json``, ``results.md`` and ``cg_iters.png`` into ``--out`` (default
``runs/cg-iters-<task>``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cgfac
from cgfac.curvature import RunningFactors
from cgfac.solvers import CGSolver
from cgfac_bench.analysis import finite_json
from cgfac_bench.hyper import LR_GRID
from cgfac_bench.machine import default_device, machine_info
from cgfac_bench.models import build_model
from cgfac_bench.tasks import TASKS, load_task_data, task_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=tuple(TASKS), default="autoencoder")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 256 (MNIST tasks), 128 (digits)")
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate (default: the smaller second-order lr of the train grid)")
    parser.add_argument("--damping", type=float, default=None, help="default: the task's")
    parser.add_argument("--kl-clip", type=float, default=None, help="default: the task's; 0 disables it")
    parser.add_argument("--fisher", choices=("empirical", "true"), default=None, help="default: the task's")
    parser.add_argument("--cg-tol", type=float, default=1e-3)
    parser.add_argument("--cg-max-iters", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/cg-iters-<task>)")
    parser.add_argument("--device", default=default_device(), help="default cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def cold_solve(pre: cgfac.CGFAC, name: str, grad: torch.Tensor) -> tuple[int, float, bool]:
    """Iterations, relative residual and convergence of a zero-started CG on a layer's last system."""
    curvature = pre.states[name].curvature
    if isinstance(curvature, RunningFactors):
        raise ValueError("cold_solve expects CG-FAC's window of rows, not running factors")
    rows = list(curvature or [])
    if len(rows) != 1:
        raise ValueError("cold_solve expects curvature_window=1 (this batch's rows only)")
    operator = pre.layers[name].operator("kron", rows, [1.0])
    damping = pre.layer_stats()[name]["damping"]
    solver = pre.solver_object
    if not isinstance(solver, CGSolver):
        raise ValueError("cold_solve expects CGFAC(solver='cg')")
    res = solver.run(operator, grad, damping, None, step=pre.steps - 1)
    return res.iters, res.rel_residual, res.converged


def grad_matrices(pre: cgfac.CGFAC) -> dict[str, torch.Tensor]:
    """Every layer's ``∇W`` after the backward pass (float32 copies)."""
    grads = {}
    for name, helper in pre.layers.items():
        grad = helper.grad_matrix()
        if grad is None:
            raise RuntimeError(f"layer {name}: no gradient after the backward pass")
        grads[name] = grad.detach().float().clone()
    return grads


def summarize(iters: list[int], converged: list[bool]) -> dict[str, float]:
    """Median, 90th percentile, maximum and the count of capped (unconverged) solves."""
    arr = np.asarray(iters, dtype=float)
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "max": float(arr.max()),
            "mean": float(arr.mean()), "not_converged": int(sum(not c for c in converged)), "solves": len(iters)}


def write_markdown(path: Path, record: dict[str, Any]) -> None:
    """``results.md``: warm against cold iterations per layer."""
    s, m = record["settings"], record["machine"]
    lines = [
        f"# CG iterations along training: {s['task']}",
        "",
        f"{s['steps']} steps of CGFAC(curvature='kron', solver='cg', Jacobi), batch {s['batch_size']}, "
        f"SGD lr {s['lr']:g} momentum {s['momentum']}, damping {s['damping']:g}, KL clip {s['kl_clip']}, "
        f"{s['fisher']} Fisher, "
        f"CG tolerance {s['cg_tol']:g}, cap {s['cg_max_iters']} iterations; device {m['device']}, {m['cpu_model']}, "
        f"torch {m['torch']}. Statistics over steps 1–{s['steps'] - 1} (step 0 has no warm start). "
        "A warm start costs one product more than its iterations (its initial residual); cold: none.",
        "",
        "| layer | d_out × d_in | warm median | warm p90 | warm max | cold median | cold p90 | cold max "
        "| warm products, mean | cold products, mean | capped warm / cold |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, layer in record["layers"].items():
        w, c = layer["warm_summary"], layer["cold_summary"]
        products = float(np.mean(layer["warm_products"][1:]))
        lines.append(f"| {name} | {layer['shape'][0]} × {layer['shape'][1]} | {w['median']:g} | {w['p90']:.1f} "
                     f"| {w['max']:g} | {c['median']:g} | {c['p90']:.1f} | {c['max']:g} | {products:.1f} "
                     f"| {c['mean']:.1f} | {w['not_converged']} / {c['not_converged']} |")
    w, c = record["all_layers"]["warm"], record["all_layers"]["cold"]
    products = float(np.mean([p for la in record["layers"].values() for p in la["warm_products"][1:]]))
    lines.append(f"| all | | {w['median']:g} | {w['p90']:.1f} | {w['max']:g} | {c['median']:g} | {c['p90']:.1f} "
                 f"| {c['max']:g} | {products:.1f} | {c['mean']:.1f} | {w['not_converged']} / {c['not_converged']} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, record: dict[str, Any]) -> None:
    """``cg_iters.png``: iterations against step, warm (left) and cold (right), one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "warm", "warm start"), (axes[1], "cold", "cold start")):
        for name, layer in record["layers"].items():
            ax.plot(layer[key], label=f"{name} ({layer['shape'][0]}×{layer['shape'][1]})", linewidth=1)
        ax.set_title(f"{record['settings']['task']}: CG iterations, {title}")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"iterations to rel. residual {record['settings']['cg_tol']:g}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def empty_layer(d_out: int, d_in: int) -> dict[str, Any]:
    """A layer's record before the first step: its shape and empty per-step lists."""
    return {"shape": [d_out, d_in], "warm": [], "cold": [], "warm_products": [], "warm_residual": [],
            "cold_residual": [], "warm_converged": [], "cold_converged": []}


def summarize_layers(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each layer's warm and cold summaries (the first step, cold either way, left out), and both pooled."""
    for layer in layers.values():
        for key in ("warm", "cold"):
            layer[f"{key}_summary"] = summarize(layer[key][1:], layer[f"{key}_converged"][1:])
    return {key: summarize([i for la in layers.values() for i in la[key][1:]],
                           [c for la in layers.values() for c in la[f"{key}_converged"][1:]])
            for key in ("warm", "cold")}


def record_step(pre: cgfac.CGFAC, layers: dict[str, dict[str, Any]], grads: dict[str, torch.Tensor], step: int) -> None:
    """Each layer's warm-started CG (this step's statistics) beside a cold solve of the same system."""
    stats = pre.layer_stats()
    for name, layer in layers.items():
        st = stats[name]
        if "iters" not in st:
            raise SystemExit(f"layer {name}: no CG solve at step {step}: {st.get('fallback')}")
        iters, residual, converged = cold_solve(pre, name, grads[name])
        layer["warm"].append(st["iters"])
        layer["warm_products"].append(st.get("products", st["iters"]))
        layer["warm_residual"].append(st["rel_residual"])
        layer["warm_converged"].append(st["converged"])
        layer["cold"].append(iters)
        layer["cold_residual"].append(residual)
        layer["cold_converged"].append(converged)


def run(args: argparse.Namespace) -> int:
    if args.steps < 2 or args.cg_max_iters < 1 or args.threads < 1 or not args.cg_tol > 0:
        raise SystemExit("--steps must be >= 2; --cg-max-iters, --threads and --cg-tol must be positive")
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = TASKS[args.task]
    batch = args.batch_size or task.batch_size
    lr = args.lr if args.lr is not None else min(LR_GRID["cgfac-kron"])
    damping = task.damping if args.damping is None else args.damping
    kl_clip = (task.kl_clip if args.kl_clip is None else args.kl_clip) or None
    momentum = 0.9
    fisher = args.fisher or task.fisher
    data = load_task_data(args.task)
    train_x, train_y = data["train_x"].to(device), data["train_y"].to(device)
    torch.manual_seed(args.seed)
    model = build_model(args.task).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    pre = cgfac.CGFAC(model, curvature="kron", solver="cg", warm_start=True, jacobi=True, cg_tol=args.cg_tol,
                      cg_max_iters=args.cg_max_iters, damping=damping, kl_clip=kl_clip, fisher=fisher,
                      lr=lambda step: opt.param_groups[0]["lr"])
    layers = {name: empty_layer(h.d_out, h.d_in) for name, h in pre.layers.items()}
    order = torch.Generator().manual_seed(args.seed)
    n = train_x.shape[0]
    perm, pos = torch.randperm(n, generator=order).to(device), 0
    losses: list[float] = []
    for _ in tqdm(range(args.steps), desc=f"cg-iters {args.task}", unit="step", dynamic_ncols=True):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=order).to(device), 0
        idx = perm[pos : pos + batch]
        pos += batch
        xb, yb = train_x[idx], train_y[idx]
        opt.zero_grad(set_to_none=True)
        out = model(xb)
        loss = task_loss(task, out, xb, yb)
        if fisher == "true":
            pre.sample_fisher(out, task.loss_type)
        loss.backward()
        grads = grad_matrices(pre)
        pre.step()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"non-finite training loss at step {len(losses) - 1}; lower --lr")
        record_step(pre, layers, grads, len(losses) - 1)
    record = {
        "settings": {"task": args.task, "steps": args.steps, "batch_size": batch, "lr": lr, "momentum": momentum,
                     "damping": damping, "kl_clip": kl_clip, "cg_tol": args.cg_tol,
                     "cg_max_iters": args.cg_max_iters, "seed": args.seed, "jacobi": True, "fisher": fisher},
        "machine": machine_info(args.device, args.threads),
        "train_loss": losses,
        "layers": layers,
        "all_layers": summarize_layers(layers),
    }
    write_outputs(args.out or Path("runs") / f"cg-iters-{args.task}", record)
    return 0


def write_outputs(out: Path, record: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``cg_iters.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite_json(record), indent=1, allow_nan=False) + "\n")
    write_markdown(out / "results.md", record)
    write_plot(out / "cg_iters.png", record)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'cg_iters.png'}")
    print((out / "results.md").read_text())
