"""Soak run: many preconditioned training steps, the process's resident memory sampled along.

Trains the MNIST autoencoder (``--task``; Bernoulli cross-entropy summed over pixels, true Fisher,
SGD with momentum) for ``--steps`` steps with a CG-FAC or K-FAC preconditioner, and reads the
resident set size (``VmRSS`` of ``/proc/self/status``) every ``--every`` steps. Leaks show as
growth after warm-up: reported as the RSS change from ``--warmup`` to the last sample and the
least-squares slope over that range (MB per 1000 steps). Writes ``soak.json``, ``soak.md`` and
``soak.png`` (RSS and loss against step) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import cgfac
from cgfac_bench.data import load_mnist
from cgfac_bench.machine import machine_info
from cgfac_bench.models import build_model

PRECONDITIONERS = {
    "cgfac": lambda m: cgfac.CGFAC(m, fisher="true", damping=1.0, kl_clip=0.1, lr=0.1, curvature_window=4),
    "kfac": lambda m: cgfac.KFAC(m, fisher="true", damping=1.0, kl_clip=0.1, lr=0.1, inv_update_steps=10),
}


def rss_mb() -> float:
    """This process's resident set size in MB (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def growth(steps: list[int], rss: list[float], warmup: int) -> tuple[float, float]:
    """RSS change (MB) from the first sample at or after ``warmup`` to the last, and the
    least-squares slope over those samples (MB per 1000 steps)."""
    pts = [(s, r) for s, r in zip(steps, rss) if s >= warmup]
    if len(pts) < 2:
        return 0.0, 0.0
    xs, ys = zip(*pts)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return ys[-1] - ys[0], slope * 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="autoencoder-tanh", help="an autoencoder task of cgfac_bench.models")
    parser.add_argument("--optimizer", default="cgfac", choices=list(PRECONDITIONERS))
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=100, help="sample RSS every this many steps")
    parser.add_argument("--warmup", type=int, default=1000, help="growth is measured from this step on")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/soak")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "every", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"soak: --{name} must be positive, got {getattr(args, name)}")
    if not args.task.startswith("autoencoder"):
        raise SystemExit(f"soak: --task must be an autoencoder task, got {args.task!r}")
    torch.manual_seed(args.seed)
    data = load_mnist()["train_x"].reshape(-1, 784)
    model = build_model(args.task)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = PRECONDITIONERS[args.optimizer](model)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(data.shape[0], generator=gen)
    steps, rss, losses = [], [], []
    start, pos, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    for step in range(args.steps + 1):
        if step % args.every == 0:
            gc.collect()
            steps.append(step)
            rss.append(rss_mb())
            losses.append(float(loss))
            print(f"step {step}: RSS {rss[-1]:.1f} MB, loss {losses[-1]:.2f}", flush=True)
        if step == args.steps:
            break
        if pos + args.batch > data.shape[0]:
            order, pos = torch.randperm(data.shape[0], generator=gen), 0
        x = data[order[pos: pos + args.batch]]
        pos += args.batch
        opt.zero_grad()
        out = model(x)
        pre.sample_fisher(out, "bernoulli")
        loss = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()
        loss.backward()
        pre.step()
        opt.step()
        loss = loss.detach()
    elapsed = time.perf_counter() - start
    change, slope = growth(steps, rss, args.warmup)
    result = {"machine": machine_info("cpu"), "args": vars(args), "steps": steps, "rss_mb": rss, "loss": losses,
              "seconds": elapsed, "growth_after_warmup_mb": change, "slope_mb_per_1000_steps": slope,
              "skipped_steps": pre.skipped_steps, "fallbacks": pre.fallbacks}
    return write_report(args, result)


def write_report(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """``soak.json``, ``soak.md`` and ``soak.png`` under ``args.out``."""
    steps, rss, losses = result["steps"], result["rss_mb"], result["loss"]
    change, slope, elapsed = result["growth_after_warmup_mb"], result["slope_mb_per_1000_steps"], result["seconds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Soak: {args.steps} steps of {args.task}, {args.optimizer}, batch {args.batch}", "",
             f"{elapsed:.0f} s; RSS {rss[0]:.1f} MB at step 0, {rss[-1]:.1f} MB at the end, peak {max(rss):.1f} MB; "
             f"after step {args.warmup}: change {change:+.2f} MB, slope {slope:+.3f} MB per 1000 steps; "
             f"{result['skipped_steps']} skipped steps, {result['fallbacks']} fallbacks.", "",
             "| step | RSS MB | loss |", "|---:|---:|---:|"]
    lines += [f"| {s} | {r:.1f} | {v:.2f} |" for s, r, v in zip(steps, rss, losses)]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib missing, no plot")
        return 0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, rss, marker=".")
    ax1.axvline(args.warmup, color="grey", linestyle=":")
    ax1.set_ylabel("RSS (MB)")
    ax1.set_title(f"{args.task}, {args.optimizer}: RSS every {args.every} steps")
    ax2.plot(steps[1:], losses[1:])
    ax2.set_ylabel("train loss")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines[:3]))
    return 0
