"""The report of a ``cgfac-bench train`` invocation: ``results.md`` (:func:`write_markdown`) and the
plots (:func:`write_plots`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cgfac_bench.analysis import best_configs, config_key, configs, time_to, time_to_interpolated
from cgfac_bench.hyper import ADAPTIVE, PEERS, SGD_MOMENTUM, SecondOrder
from cgfac_bench.peers import ADAMW_WEIGHT_DECAY, MUON_ADAMW_LR
from cgfac_bench.tasks import TASKS

PEER_SETTINGS = {  # the settings column of the peers
    "adam": "Adam (β = 0.9, 0.999)",
    "adamw": f"AdamW (β = 0.9, 0.999, weight decay {ADAMW_WEIGHT_DECAY:g})",
    "sgd": f"SGD, momentum {SGD_MOMENTUM}",
    "soap": "SOAP (pytorch-optimizer defaults)",
    "shampoo": "ScalableShampoo (preconditioner every 20 steps)",
    "muon": "torch.optim.Muon (match_rms_adamw) on hidden matrices, AdamW (same lr) on the rest",
    "muon-original": f"torch.optim.Muon (original scaling) on hidden matrices, AdamW lr {MUON_ADAMW_LR:g} on the rest",
}


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


# --- the settings column -------------------------------------------------------------------------
def settings_text(name: str, hp: SecondOrder, damping: float | None = None) -> str:
    """The settings column of a run's optimizer."""
    if name in PEER_SETTINGS:
        return PEER_SETTINGS[name]
    lam = hp.damping if damping is None else damping
    if name in ADAPTIVE:
        text = (f"cgfac.optim, initial damping {lam:g} (LM-adapted), step and momentum: {hp.adaptive}, "
                f"{hp.fisher} Fisher")
        if hp.min_damping != SecondOrder.min_damping:
            text += f", min damping {hp.min_damping:g}"
        if hp.damping_form != "exact":
            text += f", {hp.damping_form} damping"
        if hp.damping_scale != "absolute":
            text += f", {hp.damping_scale} damping scale"
        if hp.quad_samples is not None:
            text += f", {hp.quad_samples} samples for the quadratic model"
        return text + (_kfac_text(hp) if name == "kfac-adaptive" else _cgfac_text(hp))
    text = f"SGD momentum {hp.momentum}, damping {lam:g}, KL clip {hp.kl_clip}, {hp.fisher} Fisher"
    if hp.graft != "none":
        text += f", grafted onto {hp.graft}'s step length"
    if hp.damping_form != "exact":
        text += f", {hp.damping_form} damping"
    return text + (_kfac_text(hp) if name == "kfac" else ", solver auto" + _cgfac_text(hp))


def _kfac_text(hp: SecondOrder) -> str:
    """K-FAC's factor settings, for :func:`settings_text`."""
    return f", factor decay {hp.factor_decay}, eigh every {hp.inv_update_steps} steps" + (
        f", factors from {hp.kfac_samples} samples" if hp.kfac_samples is not None else "") + (
        f", factors every {hp.factor_update_steps} steps" if hp.factor_update_steps != 1 else "")


def _cgfac_text(hp: SecondOrder) -> str:
    """CG-FAC's curvature settings, for :func:`settings_text`."""
    samples = "all" if hp.curvature_samples is None else hp.curvature_samples
    return f", curvature window {hp.curvature_window}, curvature samples {samples}"


# --- results.md ----------------------------------------------------------------------------------
def write_markdown(path: Path, record: dict[str, Any]) -> None:
    """``results.md``: the best configuration per optimizer (median over seeds), then every run."""
    lines = _best_header(record)
    by_config = {(c["optimizer"], c["lr"], c["damping"]): c for c in configs(record["runs"])}
    for name, index in record["best"].items():
        run = record["runs"][index]
        if "error" in run:
            lines.append(f"| {name} | {run['lr']:g} | error: {run['error']} |")
        else:
            lines.append(_best_row(record, name, run, by_config[config_key(run)]))
    lines += heldout_lines(record)
    lines += _every_run_lines(record)
    path.write_text("\n".join(lines) + "\n")


def _kind(record: dict[str, Any]) -> tuple[bool, bool]:
    """``(lm, classify)``: the task is the LM, or a classifier (test accuracy and loss)."""
    task = TASKS[record["settings"]["task"]]
    return task.lm, task.loss_type == "cross_entropy" and not task.lm


def _best_header(record: dict[str, Any]) -> list[str]:
    """The title, the protocol in words and the head of the best-configuration table."""
    s, m = record["settings"], record["machine"]
    lm, classify = _kind(record)
    target = record["target_train_loss"]
    t_ref, ref_loss = s["reference_seconds"], record.get("adam_loss_at_reference")
    seeds = s.get("seeds", [s["seed"]])
    return [
        f"# Training comparison: {s['task']}",
        "",
        f"Budget {s['budget']:g} s of training per run (evaluation excluded), batch {s['batch_size']}, "
        f"seeds {', '.join(map(str, seeds))}, device {m['device']}, {m['threads']} threads, {m['cpu_model']}, "
        f"torch {m['torch']}.",
        f"Training loss evaluated on {s['eval_samples']} fixed training samples every "
        f"{s['eval_every']:.3g} s of training. Each optimizer's row is its configuration with the lowest "
        "median final training loss over the seeds, shown by its median-seed run.",
        "Target: the lowest training loss Adam reached, "
        + (f"{target:.4g}." if target is not None else "none (no Adam run).")
        + f" Reference: Adam's loss at {t_ref:g} s, "
        + (f"{ref_loss:.4g}" if ref_loss is not None else "n/a")
        + "; 'time to reference' is the (interpolated) training time each run needs to reach it.",
        "",
        "| optimizer | lr | settings | ms/step | steps | peak RSS MB (+ over start) | final train loss "
        "(median [min, max]) | " + ("held-out bits/byte | next-byte accuracy" if lm else
                                    "test accuracy | test loss" if classify else "test loss")
        + " | time to target (s) | time to reference (s) | covered params |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if classify or lm else "---|") + "---|---|---|",
    ]


def _best_row(record: dict[str, Any], name: str, run: dict[str, Any], cfg: dict[str, Any]) -> str:
    """An optimizer's row: its best configuration (``cfg``), shown by its median-seed run."""
    lm, classify = _kind(record)
    target, ref_loss = record["target_train_loss"], record.get("adam_loss_at_reference")
    status = " (diverged)" if run["diverged"] else ""
    peak, start = run["peak_rss_mb"], run["rss_start_mb"]
    mem = _fmt(peak, ".0f") + (f" (+{peak - start:.0f})" if start is not None else "")
    if run.get("peak_cuda_mb") is not None:
        mem += f"; CUDA {run['peak_cuda_mb']:.0f}"
    if lm:
        test = f"{_fmt(run.get('test_bits_per_byte'), '.4f')} | {_fmt(run['test_accuracy'], '.2%')}"
    elif classify:
        test = f"{_fmt(run['test_accuracy'], '.2%')} | {_fmt(run['test_loss'])}"
    else:
        test = _fmt(run["test_loss"])
    reached = time_to(run, target)
    reach = "n/a" if target is None else ("not reached" if reached is None else f"{reached:.1f}")
    to_ref = time_to_interpolated(run, ref_loss)
    ref = "n/a" if ref_loss is None else ("not reached" if to_ref is None else f"{to_ref:.1f}")
    final = _fmt(cfg["median"]) + (f" [{_fmt(cfg['min'])}, {_fmt(cfg['max'])}]" if len(cfg["seeds"]) > 1
                                   else "")
    cov = run.get("coverage")
    covered = f"{cov['covered'] / cov['total']:.0%}" if cov else "–"
    run_hp = SecondOrder(**run["hyper"]) if "hyper" in run else SecondOrder(**record["settings"]["hyper"])
    return (f"| {name} | {run['lr']:g} | {settings_text(name, run_hp, run.get('damping'))} | "
            f"{_fmt(run['ms_per_step'], '.1f')} | {run['steps']} | {mem} | "
            f"{final}{status} | {test} | {reach} | {ref} | {covered} |")


def _every_run_lines(record: dict[str, Any]) -> list[str]:
    """The "Every run" section: one row per run."""
    lines = ["", "## Every run", "", "| optimizer | lr | damping | seed | steps | final train loss | final damping "
             "| status |", "|---|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        damping = "–" if run["optimizer"] in PEERS else _fmt(run.get("damping"))
        if "error" in run:
            lines.append(f"| {run['optimizer']} | {run['lr']:g} | {damping} | {run.get('seed', '–')} | – | – | – "
                         "| error |")
        else:
            lines.append(f"| {run['optimizer']} | {run['lr']:g} | {damping} | {run.get('seed', '–')} | "
                         f"{run['steps']} | {_fmt(run['final_train_loss'])} | {_fmt(run.get('final_damping'))} | "
                         f"{'diverged' if run['diverged'] else 'ok'} |")
    return lines


def heldout_lines(record: dict[str, Any]) -> list[str]:
    """The LM's held-out race (:func:`heldout_times`) as a markdown section; none without one."""
    held = record.get("heldout")
    if not held or not held["to_reference"]:
        return []
    s = record["settings"]
    ref, peer = held["reference"], held["best_peer"]

    def one(value: float, spec: str) -> str:
        return format(value, spec) if math.isfinite(value) else "not reached"

    def spread(values: Sequence[float | None], spec: str) -> str:
        vals = [math.inf if v is None else v for v in values]
        text = one(float(np.median(vals)), spec)
        return text + (f" [{one(min(vals), spec)}, {one(max(vals), spec)}]" if len(vals) > 1 else "")

    lines = ["", "## Held-out loss against time", "",
             f"Held-out loss evaluated on {s['eval_samples']} fixed held-out sequences (the same for every run) "
             f"at each evaluation. Target: each seed's final held-out loss of {ref}'s best configuration, and of "
             f"the best peer's ({peer}: the peer with the lowest median final held-out loss). Time: interpolated "
             "between evaluations; × : over the target run's own time to it. Median [min, max] over seeds.", "",
             f"| optimizer | final held-out bits/byte ({s['eval_samples']} sequences) | time to {ref}'s final (s) "
             f"| × {ref}'s time | time to {peer}'s final (s) | × {peer}'s time |", "|---|---|---|---|---|---|"]
    best = best_configs(record["runs"])
    for name, to_ref in held["to_reference"].items():
        finals = [r["heldout_curve"][-1][2] / math.log(2) for r in best[name]["members"]
                  if "error" not in r and r.get("heldout_curve")]
        to_peer = held["to_best_peer"].get(name, {"seconds": [None], "ratio": [None]})
        lines.append(f"| {name} | {spread(finals, '.4f')} | {spread(to_ref['seconds'], '.1f')} | "
                     f"{spread(to_ref['ratio'], '.2f')} | {spread(to_peer['seconds'], '.1f')} | "
                     f"{spread(to_peer['ratio'], '.2f')} |")
    return lines


# --- plots ---------------------------------------------------------------------------------------
def write_plots(out: Path, record: dict[str, Any]) -> None:
    """``loss_vs_time.png`` and ``loss_vs_steps.png`` (the best run of each optimizer; the LM tasks
    also ``heldout_vs_time.png``, their held-out curves), and, when
    the grid has several dampings or learning rates for a second-order method,
    ``loss_vs_damping_lr.png`` (median final loss of every configuration).

    The y axis is logarithmic when the losses span more than a factor of 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss_vs_time.png", 0, "training time (s)", "curve"), ("loss_vs_steps.png", 1, "step", "curve")]
    if record.get("heldout"):
        panels.append(("heldout_vs_time.png", 0, "training time (s)", "heldout_curve"))
    for fname, column, xlabel, key in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _curves_panel(ax, record, column, xlabel, key)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    _damping_lr_plot(out, record, plt)


def _curves_panel(ax: Any, record: dict[str, Any], column: int, xlabel: str, key: str) -> None:
    """The best run of each optimizer: ``run[key]``'s loss against its ``column`` (0: time, 1: step)."""
    target = record["target_train_loss"]
    losses: list[float] = []
    for name, index in record["best"].items():
        run = record["runs"][index]
        points = [c for c in run.get(key, []) if math.isfinite(c[2])]
        if not points:
            continue
        losses += [c[2] for c in points]
        label = f"{name} (lr {run['lr']:g})" + (", diverged" if run["diverged"] else "")
        ax.plot([c[column] for c in points], [c[2] for c in points], marker=".", label=label)
    if target is not None and key == "curve":
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="Adam's best")
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):  # log scale where it helps
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{'training' if key == 'curve' else 'held-out'} loss "
                  f"({record['settings']['eval_samples']} samples)")
    ax.set_title(f"{record['settings']['task']}: best run per optimizer")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _damping_lr_plot(out: Path, record: dict[str, Any], plt: Any) -> None:
    """``loss_vs_damping_lr.png``, when a second-order method ran several (damping, lr) configurations."""
    grid = [c for c in configs(record["runs"]) if c["optimizer"] not in PEERS]
    names = sorted({c["optimizer"] for c in grid})
    if not any(len({(c["lr"], c["damping"]) for c in grid if c["optimizer"] == n}) > 1 for n in names):
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    finite = [c["median"] for c in grid if math.isfinite(c["median"])]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for ax, name in zip(axes[0], names):
        mine = [c for c in grid if c["optimizer"] == name]
        ok = [c for c in mine if math.isfinite(c["median"])]
        bad = [c for c in mine if not math.isfinite(c["median"])]
        sc = ax.scatter([c["damping"] for c in ok], [c["lr"] for c in ok], c=[c["median"] for c in ok],
                        cmap="viridis_r", vmin=vmin, vmax=vmax, s=120)
        for c in ok:
            ax.annotate(f"{c['median']:.0f}", (c["damping"], c["lr"]), fontsize=7, ha="center", va="bottom",
                        xytext=(0, 6), textcoords="offset points")
        if bad:
            ax.scatter([c["damping"] for c in bad], [c["lr"] for c in bad], marker="x", color="red",
                       label="diverged")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("damping λ (initial, for *-adaptive)")
        ax.set_ylabel("lr")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.colorbar(sc, ax=axes[0].tolist(), label="median final training loss")
    fig.savefig(out / "loss_vs_damping_lr.png", dpi=120)
    plt.close(fig)
