"""Optimizers compared on one task under the same wall-clock budget per run.

Protocol, for every (optimizer, learning rate) pair of the grid:

* A fresh spawned process, so that its peak memory is its own. There the model is built after
  ``torch.manual_seed(seed)`` and the batches follow a permutation seeded by ``seed`` (reshuffled
  every epoch, the incomplete last batch dropped): every run sees the same initial weights and
  the same batches in the same order.
* The clock counts training steps only (batch indexing, forward, backward, preconditioner,
  optimizer step, and a device sync); it stops once the run has spent ``--budget`` seconds.
  CG-FAC's one-off cost-model calibration (``cgfac.solvers.cost.calibrate``, cached per process) runs
  before the clock starts; its time is recorded as ``calibration_seconds``.
* Every ``--eval-every`` seconds of that clock (default budget/12), and at the start and end,
  the training loss is evaluated on a fixed subset of 10,000 training samples (the same for every
  run), off the clock. The curve is a list of ``(elapsed_train_seconds, step, train_loss)``.
* A non-finite mini-batch or evaluation loss stops the run, which is recorded as diverged.
* After the budget: the test metric (test loss for the autoencoder; test accuracy and loss for
  the classifiers), and the peak resident memory of the training phase (Linux: ``VmHWM`` reset
  through ``/proc/self/clear_refs`` after data and model are loaded; elsewhere the process-lifetime
  ``ru_maxrss``), plus ``torch.cuda.max_memory_allocated`` on CUDA.

Tasks (``cgfac_bench.models``): ``autoencoder`` (MNIST, Bernoulli cross-entropy of the logits
summed over the 784 pixels, averaged over the batch), ``mlp`` and ``cnn`` (MNIST classification,
cross-entropy), ``cnn-norm`` (the same with BatchNorm, GroupNorm and a depthwise block), ``digits``
(scikit-learn's 8×8 digits, a quick check), ``transformer`` (a byte-level LM on the standard
library's source, :func:`cgfac_bench.data.load_stdlib_text` with context 128, capped to the first 4 MiB of
the training files and 256 KiB of the held-out ones, see ``TEXT_MAX_*``; batch 32 sequences; loss:
cross-entropy over every position, so the curvature rows are positions; training loss on 256 fixed
sequences; test metric: held-out bits per byte = loss / ln 2, and next-byte accuracy; at every
evaluation also the held-out loss on ``eval_samples`` fixed held-out sequences, the ``heldout_curve``,
from which ``results.md`` times each optimizer to AdamW's and the best peer's final held-out loss).
``adamw``: ``torch.optim.AdamW`` with weight decay 0.01. The ``*-adaptive`` optimizers fail on the
transformer with torch 2.13 on CPU: no forward AD for the fused attention kernel. Batch size 256 on MNIST
(on two CPU cores a step of batch 1000, K-FAC's classic autoencoder setting, costs about four
times as much and leaves too few steps in a short budget) and 128 on digits.

Optimizers:

* ``adam``: ``torch.optim.Adam`` (default betas).
* ``sgd``: ``torch.optim.SGD`` with momentum 0.9.
* ``cgfac-kron``, ``cgfac-exact``: ``cgfac.CGFAC(curvature="kron" | "exact", solver="auto")`` with
  the curvature of the current batch (``--curvature-window 1``); ``kfac``:
  ``cgfac.KFAC(factor_decay=0.95, inv_update_steps=10)``. Each preconditions
  ``torch.optim.SGD`` with momentum 0.9 (kfac-pytorch's setting; momentum 0 made little
  difference to K-FAC in a 150-step autoencoder trial), the preconditioner's ``lr`` being the
  optimizer's current one, with the task's damping λ, KL clip κ and Fisher.

The learning-rate grid (``LR_GRID``, the same for every task; ``--lr-grid`` overrides it):
Adam {1e-3, 3e-3}, SGD {0.03, 0.1}, CG-FAC and K-FAC {0.1, 0.3} (kfac-pytorch's default lr is
0.1). Per-task second-order settings (``TASKS``; ``--damping``, ``--kl-clip``, ``--fisher``
override them)::

    task              λ      κ      Fisher
    autoencoder       1      0.1    true (labels sampled from the model, one extra backward)
    mlp, cnn, digits  3e-3   1e-3   empirical (the data labels)

The classifiers take kfac-pytorch's defaults (λ 1e-3 to 3e-3, κ 1e-3, empirical Fisher); on
digits the sampled (true) Fisher trained all three second-order methods far more slowly. The
autoencoder's loss is summed over 784 pixels, so its Fisher is about 784 times larger. In
150-step trials there: λ = 1e-3 let the per-batch CG-FAC steps blow the loss up to ~10⁴, and
κ = 1e-3 shrank every second-order step to a crawl; with the empirical Fisher, the per-batch
CG-FAC steps descended only ~1–3 loss units per step (for the exact block the predicted
decrease ``lr·⟨∇, (F + λ)⁻¹∇⟩`` is below ``lr`` whenever ``F`` is the same batch's empirical
Fisher), while with the true Fisher all three reached the 205–212 plateau (where Adam and SGD
also pause) within 50 steps.

The best run of each optimizer is the one with the lowest final training loss. The target is the
lowest training loss Adam reached on any evaluation; time to target is the training time of the
first evaluation at or below it (resolution: the evaluation interval).

Defaults (``cgfac-bench train``): the autoencoder, 5 optimizers × 2 learning rates × 40 s of
training; with process start-up, data loading and the 14 evaluations (about 8 s per run on two
CPU cores) about 8 minutes in all on two idle CPU cores. Writes, into ``--out``
(default ``runs/train-<task>``): ``results.json`` (curves, settings, machine), ``results.md``,
``loss_vs_time.png`` and ``loss_vs_steps.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cgfac_bench import lm
from cgfac_bench.analysis import (
    adam_target,
    best_peer_heldout,
    best_runs,
    configs,
    finite_json,
    heldout_times,
    loss_at,
    time_to,
    time_to_interpolated,
)
from cgfac_bench.factory import make_optimizer
from cgfac_bench.hyper import (
    ADAPTIVE,
    ALL_OPTIMIZERS,
    LR_GRID,
    OPTIMIZERS,
    PEERS,
    SGD_MOMENTUM,
    SecondOrder,
    parse_grid,
    parse_hyper,
    parse_lr_grid,
)
from cgfac_bench.isolation import run_isolated
from cgfac_bench.lm import LM_TASKS
from cgfac_bench.loop import train_run
from cgfac_bench.machine import default_device, machine_info
from cgfac_bench.report import heldout_lines, write_markdown, write_plots
from cgfac_bench.tasks import TASKS, Task, load_task_data, model_options, save_arrays, task_loss
from cgfac_bench.tuned import TUNED

# The command line (add_arguments, run), and the names tests and scripts (benchmarks/graft-diagnosis;
# profile, cg_iters and sweep before the split) import from here, which live in: tasks (data, loss,
# evaluation), hyper (optimizer names, grids, SecondOrder), tuned (TUNED), factory (make_optimizer),
# loop (train_run), isolation (run_isolated), analysis, report (results.md and the plots).
__all__ = [
    "ALL_OPTIMIZERS",
    "LR_GRID",
    "OPTIMIZERS",
    "TASKS",
    "TUNED",
    "SecondOrder",
    "adam_target",
    "add_arguments",
    "best_peer_heldout",
    "best_runs",
    "finite_json",
    "heldout_lines",
    "heldout_times",
    "load_task_data",
    "make_optimizer",
    "model_options",
    "parse_hyper",
    "parse_lr_grid",
    "run",
    "save_arrays",
    "task_loss",
    "time_to",
    "time_to_interpolated",
    "train_run",
]


# --- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_comparison_arguments(parser)
    _add_run_arguments(parser)
    _add_second_order_arguments(parser)


def _add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, the optimizers and their grids (the first options of ``--help``)."""
    parser.add_argument("--task", choices=(*TASKS, *LM_TASKS), default="autoencoder",
                        help="nanogpt-s, nanogpt-m, nanogpt-moe-s: the step-based LM benchmark (cgfac_bench.lm; "
                             "--iters, --wd-grid, --jobs)")
    parser.add_argument("--iters", type=int, default=None,
                        help="nanogpt-*: training iterations per run (default: the task's, 2000 or 3000)")
    parser.add_argument("--wd-grid", default=None, help='nanogpt-*: weight decays, like --lr-grid')
    parser.add_argument("--jobs", type=int, default=1,
                        help="nanogpt-*: runs at once (one thread each unless --threads): for tuning only")
    parser.add_argument("--width-mult", type=float, default=4.0,
                        help="autoencoder-wide: hidden widths times this (default 4)")
    parser.add_argument("--width", type=int, default=2048, help="mlp-wide: hidden width (default 2048)")
    parser.add_argument("--budget", type=float, default=40.0, help="training seconds per run (default 40)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated subset of {','.join(ALL_OPTIMIZERS)} (default: "
                             f"{','.join(OPTIMIZERS)}; with --tuned, the task's tuned ones)")
    parser.add_argument("--tuned", action="store_true",
                        help="each optimizer at its tuned learning rate and damping (TUNED); the grids override")
    parser.add_argument("--damping-grid", default=None,
                        help='dampings of the second-order methods, like --lr-grid: "0.01,0.1" or "kfac=1;..." '
                             "(default: the task's damping)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, each run once per seed (default: --seed)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How each run is made and measured (the middle options of ``--help``)."""
    parser.add_argument("--adaptive", choices=("lr+momentum", "lr", "none"), default=SecondOrder.adaptive,
                        help="the *-adaptive optimizers: what the quadratic model chooses ('none': fixed lr, "
                             "momentum --momentum, fixed damping)")
    parser.add_argument("--quad-samples", type=int, default=None,
                        help="the *-adaptive optimizers: samples of each batch for the GGN products (default all)")
    parser.add_argument("--reference-seconds", type=float, default=None,
                        help="'time to reference' is the time to reach Adam's loss at this many seconds "
                             "(default min(60, budget/5))")
    parser.add_argument("--lr-grid", default=None,
                        help='override the grid: "0.1,0.3" for all, or "adam=1e-3,3e-3;kfac=0.1"')
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 1000 (autoencoders), 256 (other MNIST tasks), 128 (digits), "
                             "32 sequences (transformer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run, launched by torchrun (DDP; the batch is the global batch)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/train-<task>)")
    parser.add_argument("--device", default=default_device(), help="default cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each run (default: torch's default here; nanogpt-* with "
                             "--jobs > 1: 1)")
    parser.add_argument("--eval-every", type=float, default=None,
                        help="training seconds between evaluations (default budget/12)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="size of the fixed training subset for the training loss (default: the task's, "
                             "10,000 samples; transformer: 256 sequences)")


def _add_second_order_arguments(parser: argparse.ArgumentParser) -> None:
    """The second-order methods' settings, and the LM benchmark's joined runs (the last options)."""
    parser.add_argument("--damping", type=float, default=None,
                        help="damping of the second-order methods (default: the task's)")
    parser.add_argument("--kl-clip", type=float, default=None,
                        help="KL clip of the second-order steps (default: the task's); 0 disables it")
    parser.add_argument("--momentum", type=float, default=SecondOrder.momentum,
                        help="SGD momentum under the preconditioners")
    parser.add_argument("--curvature-window", type=int, default=SecondOrder.curvature_window,
                        help="CG-FAC: number of recent batches whose rows form the curvature")
    parser.add_argument("--curvature-samples", type=int, default=None,
                        help="CG-FAC: samples of each batch whose rows form the curvature (default: the task's)")
    parser.add_argument("--from-runs", nargs="+", default=None, metavar="RUNS_JSONL",
                        help="nanogpt-*: runs recorded by earlier invocations (their runs.jsonl) joined to this "
                             "one's report; without --optimizers, only the report is written")
    parser.add_argument("--hyper", default=None,
                        help='settings of the second-order runs, overriding the tuned ones: "kfac_samples=250,'
                             'min_damping=1e-3" (fields of cgfac_bench.train.SecondOrder; "none" for None); '
                             'nanogpt-*: keywords of the optimizer, "|" between alternatives run as a grid')
    parser.add_argument("--fisher", choices=("empirical", "true"), default=None,
                        help="Fisher of the second-order methods (default: the task's)")


def run(args: argparse.Namespace) -> int:
    if args.task in LM_TASKS:  # the step-based LM benchmark
        return lm.run(args, "cgfac-bench train " + " ".join(sys.argv[2:]))
    if args.threads is None:
        args.threads = torch.get_num_threads()
    tuned = TUNED.get(args.task, {}) if args.tuned else {}
    if args.tuned and not tuned:
        raise SystemExit(f"--tuned: no tuned settings for task {args.task!r}; tuned tasks: {', '.join(TUNED)}")
    optimizers = _optimizers(args, tuned)
    task = TASKS[args.task]
    grid, dampings, seeds, cli_hyper = _grids(args, task, tuned, optimizers)
    if any(o in ADAPTIVE for o in optimizers) and args.nproc > 1:
        raise SystemExit("--nproc > 1: the *-adaptive optimizers are not run across processes by this benchmark yet")
    eval_samples = task.eval_samples if args.eval_samples is None else args.eval_samples
    if args.budget <= 0 or min(args.threads, eval_samples, args.curvature_window, args.nproc) < 1:
        raise SystemExit("--budget, --threads, --eval-samples, --curvature-window and --nproc must be positive")
    hp = _second_order(args, task)
    out = args.out or Path("runs") / f"train-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_task_data(args.task)
    settings = {
        "task": args.task, "budget": args.budget, "batch_size": args.batch_size or task.batch_size, "seed": args.seed,
        "seeds": seeds, "damping_grid": dampings, "tuned": bool(tuned),
        "reference_seconds": args.reference_seconds or min(60.0, args.budget / 5),
        "eval_every": args.eval_every or args.budget / 12, "eval_samples": min(eval_samples, data["train_x"].shape[0]),
        "optimizers": optimizers, "lr_grid": grid, "hyper": asdict(hp), "sgd_momentum": SGD_MOMENTUM,
        "n_train": data["train_x"].shape[0], "n_test": data["test_x"].shape[0], "nproc": args.nproc,
        "model_options": model_options(args.task, args),
    }
    jobs = [(name, lr, damping if name not in PEERS else None, seed) for name in optimizers for lr in grid[name]
            for damping in (dampings[name] if name not in PEERS else [None]) for seed in seeds]
    with tempfile.TemporaryDirectory(prefix="cgfac-train-") as tmp:
        save_arrays(data, Path(tmp))
        del data
        runs = _run_jobs(args, settings, jobs, tuned, cli_hyper, tmp)
    record = _comparison(args, settings, runs, task)
    (out / "results.json").write_text(json.dumps(finite_json(record), indent=1, allow_nan=False) + "\n")
    write_markdown(out / "results.md", record)
    write_plots(out, record)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, loss_vs_time.png, loss_vs_steps.png")
    print((out / "results.md").read_text())
    return 1 if any("error" in r for r in runs) else 0


def _optimizers(args: argparse.Namespace, tuned: dict[str, dict[str, Any]]) -> list[str]:
    """``--optimizers``, by default the task's tuned ones (``--tuned``) or :data:`OPTIMIZERS`."""
    listed = args.optimizers or ",".join(tuned or OPTIMIZERS)
    optimizers = [o.strip() for o in listed.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in ALL_OPTIMIZERS]
    if unknown or not optimizers:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {','.join(ALL_OPTIMIZERS)}")
    return optimizers


def _grids(args: argparse.Namespace, task: Task, tuned: dict[str, dict[str, Any]], optimizers: list[str]
           ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[int], dict[str, Any]]:
    """The learning rates and dampings per optimizer, the seeds and ``--hyper``'s overrides."""
    lr_defaults = {n: (tuned[n]["lr"],) if n in tuned else LR_GRID[n] for n in ALL_OPTIMIZERS}
    damping_defaults = {n: (tuned[n]["damping"],) if n in tuned and "damping" in tuned[n]
                        else (task.damping if args.damping is None else args.damping,) for n in ALL_OPTIMIZERS}
    try:
        grid = parse_grid(args.lr_grid, optimizers, lr_defaults)
        dampings = parse_grid(args.damping_grid, optimizers, damping_defaults, "--damping-grid")
        seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
        cli_hyper = parse_hyper(args.hyper)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return grid, dampings, seeds, cli_hyper


def _second_order(args: argparse.Namespace, task: Task) -> SecondOrder:
    """The second-order settings from the command line and the task's defaults."""
    kl_clip = task.kl_clip if args.kl_clip is None else args.kl_clip
    return SecondOrder(damping=task.damping if args.damping is None else args.damping, kl_clip=kl_clip or None,
                       momentum=args.momentum, curvature_window=args.curvature_window,
                       curvature_samples=args.curvature_samples or task.curvature_samples,
                       fisher=args.fisher or task.fisher, adaptive=args.adaptive, quad_samples=args.quad_samples)


def _run_jobs(args: argparse.Namespace, settings: dict[str, Any], jobs: list[tuple[str, float, float | None, int]],
              tuned: dict[str, dict[str, Any]], cli_hyper: dict[str, Any], tmp: str) -> list[dict[str, Any]]:
    """Every (optimizer, lr, damping, seed) job, each in processes of its own (the task's arrays in
    ``tmp``), under one progress bar."""
    from tqdm import tqdm

    runs: list[dict[str, Any]] = []
    with tqdm(total=len(jobs) * args.budget, unit="s", desc=args.task, dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s train [{elapsed}<{remaining}]") as bar:
        for i, (name, lr, damping, seed) in enumerate(jobs):
            label = f"{name} lr={lr:g}" + (f" λ={damping:g}" if damping is not None else "") + f" seed={seed}"
            bar.set_description(label)
            advance = _advance(bar, i * args.budget, args.budget)
            cfg = {**settings, "optimizer": name, "lr": lr, "damping": damping, "seed": seed, "device": args.device,
                   "hyper_overrides": {**tuned.get(name, {}).get("hyper", {}), **cli_hyper},
                   "threads": max(1, args.threads // args.nproc), "data_dir": tmp}
            result = run_isolated(cfg, advance)
            advance(args.budget)
            runs.append(result)
            if "error" in result:
                result.update(damping=damping, seed=seed)
                bar.write(f"{label}: error: {result['error']}")
            else:
                bar.set_postfix_str(f"last: {name} {result['final_train_loss']:.4g}"
                                    + (" diverged" if result["diverged"] else ""))
    return runs


def _advance(bar: Any, start: float, budget: float) -> Callable[[float], None]:
    """Move ``bar`` to a job's elapsed training seconds (the job's share of the bar starts at ``start``)."""

    def advance(seconds: float) -> None:
        bar.update(max(0.0, min(start + seconds, start + budget) - bar.n))

    return advance


def _comparison(args: argparse.Namespace, settings: dict[str, Any], runs: list[dict[str, Any]],
                task: Task) -> dict[str, Any]:
    """The record of ``results.json``: settings, machine, runs, each optimizer's best and its times."""
    best = best_runs(runs)
    target = adam_target(runs)
    reference = loss_at(best["adam"], settings["reference_seconds"]) if "adam" in best else None
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v
                 for k, v in vars(args).items() if not k.startswith("_")},
        "settings": settings,
        "machine": machine_info(args.device, args.threads),
        "target_train_loss": target,
        "runs": runs,
        "best": {name: runs.index(run) for name, run in best.items()},
        "time_to_target": {name: time_to(run, target) for name, run in best.items()},
        "adam_loss_at_reference": reference,
        "time_to_reference": {name: time_to_interpolated(run, reference) for name, run in best.items()},
        "configs": [{k: v for k, v in c.items() if k not in ("median_run", "members")} for c in configs(runs)],
    }
    if task.lm:  # the held-out race: against AdamW (Adam without it) and against the best peer
        ref_name = "adamw" if "adamw" in best else "adam"
        best_peer = best_peer_heldout(runs)
        record["heldout"] = {"reference": ref_name, "best_peer": best_peer,
                             "to_reference": heldout_times(runs, ref_name),
                             "to_best_peer": heldout_times(runs, best_peer) if best_peer else {}}
    return record
