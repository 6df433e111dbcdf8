"""``cgfac-bench train`` over widths: time to a fixed training loss per optimizer and width.

For each width (``--widths``: multipliers of ``autoencoder-wide``'s hidden widths, or
``mlp-wide``'s hidden width) one ``cgfac-bench train`` comparison runs (into ``--out/w<width>``),
with every other option passed through (``--tuned``, ``--optimizers``, ``--budget``, ``--seeds``,
...). Then, for each optimizer's best configuration at each width (median seed, as ``train``
picks it): the training seconds to reach ``--target`` (interpolated between evaluations; None
when not reached), the final training loss and the time per step. Writes ``sweep.json``,
``sweep.md`` (with, for each peer, the first width at which CG-FAC reaches the target sooner)
and ``time_to_target.png`` / ``final_loss.png`` (against width, one line per optimizer).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from cgfac_bench import train
from cgfac_bench.analysis import time_to_interpolated

OURS = ("cgfac-kron-adaptive", "cgfac-exact-adaptive", "cgfac-kron", "cgfac-exact")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=("autoencoder-wide", "mlp-wide"), default="autoencoder-wide")
    parser.add_argument("--widths", default="1,2,4",
                        help="autoencoder-wide: width multipliers; mlp-wide: hidden widths (default 1,2,4)")
    parser.add_argument("--target", type=float, required=True, help="the training loss to reach")
    parser.add_argument("--out", type=Path, default=None, help="default runs/sweep-<task>")
    parser.add_argument("--from-results", action="store_true",
                        help="train nothing: summarise the runs already in --out/w<width>/results.json")
    parser.add_argument("train_options", nargs=argparse.REMAINDER,
                        help="options passed to cgfac-bench train (after --)")


def _train_args(task: str, width: str, out: Path, options: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    flag = "--width-mult" if task == "autoencoder-wide" else "--width"
    return parser.parse_args(["--task", task, flag, width, "--out", str(out), *options])


def summarise(task: str, widths: list[str], records: dict[str, dict[str, Any]], target: float) -> dict[str, Any]:
    """Per optimizer and width: time to ``target``, final loss, ms/step of the best configuration."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for width in widths:
        record = records[width]
        for name, index in record["best"].items():
            run = record["runs"][index]
            run = {**run, "curve": [c for c in run.get("curve", []) if c[2] is not None]}  # JSON: None = non-finite
            usable = "error" not in run and not run.get("diverged")
            table.setdefault(name, {})[width] = {
                "lr": run.get("lr"), "time_to_target": time_to_interpolated(run, target) if usable else None,
                "final_train_loss": run.get("final_train_loss") if usable else None,
                "test_loss": run.get("test_loss") if usable else None, "ms_per_step": run.get("ms_per_step"),
                "steps": run.get("steps")}
    ours = next((o for o in OURS if o in table), None)
    overtakes: dict[str, str | None] = {}
    ahead: dict[str, list[str]] = {}
    if ours is not None:
        for name in table:
            if name == ours:
                continue
            wins = [_sooner(table[ours].get(w), table[name].get(w)) for w in widths]
            ahead[name] = [w for w, won in zip(widths, wins) if won]
            # The narrowest width from which CG-FAC is ahead at every wider width swept.
            overtakes[name] = next((w for i, w in enumerate(widths) if all(wins[i:])), None)
    return {"task": task, "widths": widths, "target": target, "ours": ours, "table": table, "overtakes": overtakes,
            "ahead": ahead}


def _sooner(mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> bool:
    """CG-FAC reaches the target first, or (neither reaching it) ends lower."""
    if mine is None or theirs is None:
        return False
    a, b = mine["time_to_target"], theirs["time_to_target"]
    if a is not None:
        return b is None or a < b
    if b is not None:
        return False
    la, lb = mine["final_train_loss"], theirs["final_train_loss"]
    return la is not None and (lb is None or la < lb)


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def write_markdown(path: Path, summary: dict[str, Any]) -> None:
    widths, table = summary["widths"], summary["table"]
    label = "width ×" if summary["task"] == "autoencoder-wide" else "width "
    lines = [f"# Width sweep: {summary['task']}, time to training loss {summary['target']:g}", "",
             "Seconds of training to reach the target (not reached: –), then final training loss and ms/step, "
             "for each optimizer's best configuration at each width.", "",
             "| optimizer | " + " | ".join(f"{label}{w}" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for name, row in table.items():
        cells = []
        for w in widths:
            c = row.get(w)
            cells.append("–" if c is None else f"{_fmt(c['time_to_target'])} s ({_fmt(c['final_train_loss'], '.4g')}, "
                         f"{_fmt(c['ms_per_step'], '.0f')} ms)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["ours"] is not None:
        lines += ["", f"Where {summary['ours']} reaches the target sooner (or, neither reaching it, ends lower):", ""]
        for name, w in summary["overtakes"].items():
            at = summary.get("ahead", {}).get(name, [])
            where = ", ".join(f"{label}{v}" for v in at) if at else "none"
            lines.append(f"- against {name}: " + (f"from {label}{w} on (at every wider width swept)" if w is not None
                                                  else "not from any width on") + f"; ahead at: {where}")
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(w) for w in summary["widths"]]
    for fname, key, ylabel in (("time_to_target.png", "time_to_target", f"seconds to loss {summary['target']:g}"),
                               ("final_loss.png", "final_train_loss", "final training loss")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name, row in summary["table"].items():
            pts = [(x, row[w][key]) for x, w in zip(xs, summary["widths"]) if w in row and row[w][key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width multiplier" if summary["task"] == "autoencoder-wide" else "hidden width")
        ax.set_ylabel(ylabel + (" (missing: not reached)" if key == "time_to_target" else ""))
        ax.set_title(f"{summary['task']}: {ylabel}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    if not widths:
        raise SystemExit("--widths: give at least one width")
    out = args.out or Path("runs") / f"sweep-{args.task}"
    options = [o for o in args.train_options if o != "--"]
    records, status = {}, 0
    for width in widths:
        sub = out / f"w{width}"
        if not args.from_results:
            status |= train.run(_train_args(args.task, width, sub, options))
        records[width] = json.loads((sub / "results.json").read_text())
    summary = summarise(args.task, widths, records, args.target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(out / "sweep.md", summary)
    write_plots(out, summary)
    print((out / "sweep.md").read_text())
    return status
