"""The automatic solve-method choice against every candidate, layer by layer.

For each configuration ``model:batch`` (default the autoencoder at batch 256 and 1000, the MLP
at 256, the CNN at 128) a model from :mod:`cgfac_bench.models` (seeded, train mode, fixed
weights) sees ``--steps + 1`` fresh random batches of the right shape (autoencoder: uniform
pixels, Bernoulli cross-entropy against themselves; classifiers: uniform inputs, random labels,
cross-entropy; the transformer: uniform random tokens, a random next byte per position).
A ``CGFAC`` instance captures each covered layer's real rows (conv layers:
``n·T`` patch rows) and ``∇W`` (blocks solved in closed form, embeddings and normalisation
layers, have no choice and are left out). For both curvatures (the layer helper's operator:
``kron``: ``KronRows``; ``exact``: ``ExactRows``) every candidate solver of ``solver="auto"``
(:mod:`cgfac.solvers`) is timed on batches ``1..steps`` from the built operator to ``X``
(median of repeats per batch, mean over batches):

* ``cg``: Jacobi-preconditioned CG warm-started from the previous batch's solution (batch 0 is
  an untimed cold solve), the library's ``cg_max_iters``/``cg_tol``; mean iterations reported.
* ``lowrank``: the exact Gram-matrix solve; ``eigen`` (kron only): factors + eigh + solve.

``auto`` is :meth:`cgfac.solvers.AutoSolver.choose` replayed along the batches with a layer's
solver state (the last measured CG products, and its CG probes); its time at a batch is the measured time of the
candidate it picks there plus the measured time of the decision itself. A probe (a warm-started
CG run to measure the iteration count where CG might win) happens once per ``CG_PROBE_STEPS``
steps in training, so its extra time is charged at that rate (and reported). Per layer and
curvature: the fastest candidate, auto's pick(s), ``auto / fastest`` (target ≤ 1.10).
Candidates whose estimated memory exceeds ``--max-memory-gb`` are skipped (recorded).

The cost model's predictions are checked with a weighted least-squares fit per candidate of
``time ≈ α·(predicted multiply-adds at the measured iterations) + β·calls`` (``calls``: CG
iterations, else 1): equal ``α`` across candidates and ``β ≈ 0`` mean the model's constants fit
this machine; the report gives the factors that would make them fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cgfac import CGFAC
from cgfac.curvature import ExactRows, KronRows
from cgfac.layers import Rows
from cgfac.solvers import CG_PROBE_STEPS, DEFAULT_CG_PRODUCTS, AutoSolver, CGSolver, SolverState
from cgfac.solvers import candidates as solver_candidates
from cgfac.solvers.cost import CostConstants, calibrate, predicted_costs
from cgfac_bench.layer import Timing, measure
from cgfac_bench.machine import default_device, machine_info
from cgfac_bench.models import INPUT_SHAPES, build_model, example_input

CONFIGS = "autoencoder:256,autoencoder:1000,mlp:256,cnn:128"
CANDIDATES = {kind: tuple(s.name for s in solver_candidates(kind)) for kind in ("kron", "exact")}
TARGET = 1.10


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``"mlp:256,cnn:128"`` → ``[("mlp", 256), ("cnn", 128)]`` (argparse type)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        task, _, batch = item.partition(":")
        if task not in INPUT_SHAPES or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(
                f"expected model:batch with model in {sorted(INPUT_SHAPES)}, got {item!r}")
        out.append((task, int(batch)))
    if not out:
        raise argparse.ArgumentTypeError("no configuration given")
    return out


def batch_loss(task: str, model: nn.Module, batch: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """The training loss of one random batch (mean over samples)."""
    x = example_input(task, batch, gen).to(device)
    out = model(x)
    if task == "autoencoder":
        return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / batch
    labels = torch.randint(out.shape[-1], out.shape[:-1], generator=gen).to(device)  # per position for LMs
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))


def capture(task: str, batch: int, steps: int, pre_kwargs: dict[str, Any], seed: int,
            device: torch.device) -> tuple[CGFAC, list[dict[str, tuple[Rows, Tensor]]]]:
    """The model's ``CGFAC`` (solver="auto") and, per batch, every covered layer's rows and ``∇W``."""
    torch.manual_seed(seed)
    model = build_model(task).to(device).train()
    pre = CGFAC(model, solver="auto", kl_clip=None, **pre_kwargs)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps + 1):
        model.zero_grad(set_to_none=True)
        batch_loss(task, model, batch, gen, device).backward()
        per_layer = {}
        for name, helper in pre.layers.items():
            rows = helper.take_rows(mean_reduced=pre.loss_reduction == "mean", max_samples=None)
            grad = helper.grad_matrix()
            if rows is None or grad is None:
                raise RuntimeError(f"choice: layer {name!r} has no captured rows or no gradient")
            per_layer[name] = (rows, grad.detach().clone())
        batches.append(per_layer)
    return pre, batches


def estimated_bytes(curvature: str, method: str, op: KronRows | ExactRows, n: int) -> int:
    """A rough upper estimate of a candidate's peak memory (float32), for the skip rule."""
    d_in, d_out = op.a.shape[1], op.g.shape[1]
    r_a, r_g = op.a.shape[0], op.g.shape[0]
    p = d_in * d_out
    narrow = r_g * r_a * (d_in + d_out) < (r_g + r_a) * p  # KronRows.matvec's choice of order
    q_a, q_g = min(r_a, d_in), min(r_g, d_out)  # factor_basis: the rows' Gram, or the d × d factor
    exact_gram = n * p + n * n if isinstance(op, ExactRows) and op.gram_through_samples() else 4 * r_a**2
    floats = {
        ("kron", "cg"): r_a * d_in + r_g * d_out + (r_a * r_g if narrow else 0) + 10 * p,
        ("kron", "lowrank"): 3 * (q_a**2 + q_g**2) + 2 * (q_a * d_in + q_g * d_out) + q_a * q_g + 4 * p,
        ("kron", "eigen"): 4 * (d_in**2 + d_out**2) + 4 * p,
        ("exact", "cg"): 2 * r_a * (d_in + d_out) + 10 * p,
        ("exact", "lowrank"): exact_gram + 2 * n**2 + 2 * r_a * (d_in + d_out) + 4 * p,
    }[(curvature, method)]
    return 4 * floats


class ChoiceBench:
    """Times every candidate and replays the auto choice for one layer and curvature."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device

    def _measure(self, fn: Callable[[], Any], first: bool) -> Timing:
        a = self.args
        return measure(fn, self.device, warmup=1 if first else 0, repeats=a.repeats, budget_s=a.time_budget,
                       max_s=a.max_seconds, memory=False)

    def layer(self, pre: CGFAC, name: str, curvature: str, steps: list[tuple[Rows, Tensor]],
              calib: CostConstants) -> dict[str, Any]:
        """One layer and curvature: candidate times, auto's picks and its ratio to the fastest."""
        helper = pre.layers[name]
        ops = [helper.operator(curvature, [rows], [1.0]) for rows, _ in steps]
        grads = [g for _, g in steps]
        damping = pre.damping(0)
        auto = AutoSolver(CGSolver(pre.cg_max_iters, pre.cg_tol(0), jacobi=True), constants=calib)
        n = steps[0][0].n
        rec: dict[str, Any] = {"layer": name, "curvature": curvature, "d_out": grads[0].shape[0],
                               "d_in": grads[0].shape[1], "rows": ops[0].a.shape[0], "samples": n,
                               "candidates": {}}

        def run_cg(op: KronRows | ExactRows, grad: Tensor, x0: Tensor | None) -> Any:
            return auto.cg.run(op, grad, damping, x0)

        def run_other(method: str, op: KronRows | ExactRows, grad: Tensor) -> Tensor | None:
            return auto.candidate(method).solve(op, grad, damping, SolverState()).x

        cold = run_cg(ops[0], grads[0], None)
        cg_iters = [cold.iters]
        for method in CANDIDATES[curvature]:
            est = estimated_bytes(curvature, method, ops[0], n)
            if est > self.args.max_memory_gb * 2**30:
                rec["candidates"][method] = {"skipped": f"estimated memory {est / 2**30:.1f} GiB > "
                                                        f"--max-memory-gb {self.args.max_memory_gb:g}"}
                continue
            times: list[float] = []
            x = cold.x
            for t in range(1, len(ops)):
                if method == "cg":
                    timing = self._measure(functools.partial(run_cg, ops[t], grads[t], x), t == 1)
                    x = timing.result.x
                    cg_iters.append(timing.result.iters)
                else:
                    timing = self._measure(functools.partial(run_other, method, ops[t], grads[t]), t == 1)
                times.append(timing.seconds)
                if timing.seconds > self.args.max_seconds:
                    break
            entry: dict[str, Any] = {"time_ms": statistics.fmean(times) * 1e3, "per_step_ms": [1e3 * s for s in times]}
            if method == "cg":
                entry["iters"] = statistics.fmean(cg_iters[1:])
            rec["candidates"][method] = entry
        measured = {m: c["time_ms"] for m, c in rec["candidates"].items() if "time_ms" in c}
        rec["fastest"] = min(measured, key=measured.__getitem__) if measured else None
        rec.update(self._auto(auto, ops, grads, cg_iters, rec, calib))
        fastest = measured.get(rec["fastest"]) if rec["fastest"] else None
        rec["ratio"] = rec["auto_ms"] / fastest if fastest and rec["auto_ms"] is not None else None
        rec["met"] = rec["ratio"] is not None and rec["ratio"] <= TARGET
        return rec

    def _auto(self, auto: AutoSolver, ops: list[KronRows | ExactRows], grads: list[Tensor],
              cg_iters: list[int], rec: dict[str, Any], calib: CostConstants) -> dict[str, Any]:
        """Replay ``auto.choose`` along the batches with one layer's solver state (with its CG
        probes: a warm start exists after the untimed first step); auto's time is its picks'
        measured times."""
        state = SolverState(solution=grads[0])
        picks, times, probes, ks = [], [], [], []
        for t, (op, grad) in enumerate(zip(ops, grads)):
            ks.append(DEFAULT_CG_PRODUCTS if state.last_iters is None else state.last_iters)
            method, _ = auto.choose(op, grad, None, state, step=t)
            if method == "cg":  # products: iterations plus the warm start's residual
                state.last_iters = cg_iters[min(t, len(cg_iters) - 1)] + (t > 0)
            if t == 0:
                continue
            cand = rec["candidates"].get(method, {})
            steps = cand.get("per_step_ms", [])
            ms = steps[t - 1] if t - 1 < len(steps) else cand.get("time_ms", math.inf)
            if state.probed_at == t:
                probes.append(ms)
            else:
                picks.append(method)
                times.append(ms)
        picks = picks or ["cg"] * len(probes)  # every timed step was a probe (very short runs)
        last = len(ops) - 1
        decide = self._measure(lambda: auto.choose(ops[-1], grads[-1], None, state, step=last), True).seconds * 1e3
        iters = rec["candidates"].get("cg", {}).get("iters")
        actual_k = max(1, round(iters)) if iters is not None else ks[-1]
        # A probe (one warm-started CG run to measure its iterations) happens once per
        # CG_PROBE_STEPS steps, so it is charged at that rate; the steady choice is the rest.
        steady = statistics.fmean(times) if times else (statistics.fmean(probes) if probes else math.inf)
        probe_ms = statistics.fmean(probes) if probes else None
        auto_ms = steady + decide + (0.0 if probe_ms is None else (probe_ms - steady) / CG_PROBE_STEPS)
        return {"auto_picks": dict(Counter(picks)), "auto_ms": auto_ms if math.isfinite(auto_ms) else None,
                "probe_ms": probe_ms,
                "decision_ms": decide, "k_predicted": ks[-1],
                "predicted_cost": predicted_costs(ops[-1], ks[-1], calib),
                "cost_at_measured_iters": predicted_costs(ops[-1], actual_k, calib)}


def calibration_fit(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per candidate, ``time ≈ α·cost + β·calls`` by least squares relative to time (α, β ≥ 0).

    ``cost`` is the model's multiply-adds at the measured iterations; ``calls`` CG iterations
    (else 1). Also ``scale``: α over kron CG's α (the factor the model's cost of that candidate
    is off by, relative to kron CG), and ``overhead_macs``: β / α of kron CG (a fixed cost per
    call or iteration, in multiply-adds, that the model would need to add).
    """
    points: dict[str, list[tuple[float, float, float]]] = {}
    for r in records:
        for method, c in r["candidates"].items():
            if "time_ms" not in c:
                continue
            calls = c.get("iters", 1.0) or 1.0
            points.setdefault(f"{r['curvature']}-{method}", []).append(
                (r["cost_at_measured_iters"][method], calls, c["time_ms"] * 1e-3))
    fits: dict[str, dict[str, Any]] = {}  # points (int), alpha, beta, rms_rel_error, scale, overhead_macs
    for key, pts in points.items():
        x = np.array([[p[0], p[1]] for p in pts])
        y = np.array([p[2] for p in pts])
        w = 1 / y
        fits[key] = {"points": len(pts), **_nonneg_fit(x * w[:, None], y * w)}
    ref = fits.get("kron-cg", {}).get("alpha")
    for f in fits.values():
        f["scale"] = f["alpha"] / ref if ref else None
        f["overhead_macs"] = f["beta"] / ref if ref else None
    return fits


def replay(records: list[dict[str, Any]], fits: dict[str, dict[str, Any]], measured_k: bool) -> int:
    """How many layers the choice would get within the target if it predicted time by the fit.

    Predicted time ``α·cost + β·calls`` per candidate, with CG's cost and calls at the
    iterations the library assumes (``measured_k`` False) or at the measured ones (True).
    """
    met = 0
    for r in records:
        costs = r["cost_at_measured_iters" if measured_k else "predicted_cost"]
        times = {m: c["time_ms"] for m, c in r["candidates"].items() if "time_ms" in c}
        predicted = {}
        for m, value in costs.items():
            f = fits.get(f"{r['curvature']}-{m}")
            if f is None:
                continue
            calls = (r["candidates"]["cg"].get("iters", 1) if measured_k else r["k_predicted"]) if m == "cg" else 1
            predicted[m] = f["alpha"] * value + f["beta"] * calls
        if not predicted or not times:
            continue
        pick = min(predicted, key=predicted.__getitem__)
        met += pick in times and times[pick] <= TARGET * min(times.values())
    return met


def _nonneg_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares ``y ≈ x @ (α, β)`` with α, β ≥ 0 (two unknowns: check the faces)."""
    best: tuple[float, float, float] | None = None
    candidates = [np.linalg.lstsq(x, y, rcond=None)[0]]
    for j in (0, 1):
        col = x[:, j]
        coef = float(col @ y / (col @ col)) if col @ col > 0 else 0.0
        candidates.append(np.array([coef, 0.0]) if j == 0 else np.array([0.0, coef]))
    for c in candidates:
        if (c < 0).any():
            continue
        err = float(np.sum((x @ c - y) ** 2))
        if best is None or err < best[2]:
            best = (float(c[0]), float(c[1]), err)
    alpha, beta, err = best if best is not None else (0.0, 0.0, math.inf)
    return {"alpha": alpha, "beta": beta, "rms_rel_error": math.sqrt(err / len(y))}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def markdown(report: dict[str, Any]) -> str:
    """The per-layer table, the mispredictions and the calibration fit."""
    lines = ["# cgfac-bench choice", "",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['threads']} threads, "
             f"torch {report['machine']['torch']}, device {report['machine']['device']}. "
             "Cost-model calibration: " + ", ".join(f"{k} = {v:.3g}" for k, v in report["calibration"].items())
             + ".",
             "Times: mean over the timed batches of the median ms per solve (from the built operator).", "",
             "| config | layer | d_out×d_in | rows | curv. | cg ms (iters) | lowrank ms | eigen ms | fastest "
             "| auto (k) | auto/fastest | target ≤ 1.10 |",
             "|---" * 12 + "|"]
    for r in report["layers"]:
        c = r["candidates"]

        def cell(method: str, c: dict[str, Any] = c) -> str:
            if method not in c:
                return ""
            if "skipped" in c[method]:
                return "skip (memory)"
            text = _fmt(c[method]["time_ms"])
            return text + (f" ({_fmt(c[method]['iters'], 2)})" if "iters" in c[method] else "")

        picks = ",".join(f"{k}×{v}" if v > 1 else k for k, v in r["auto_picks"].items())
        lines.append(f"| {r['config']} | {r['layer']} | {r['d_out']}×{r['d_in']} | {r['rows']} | {r['curvature']} "
                     f"| {cell('cg')} | {cell('lowrank')} | {cell('eigen')} | {r['fastest']} | {picks} "
                     f"({r['k_predicted']}) | {_fmt(r['ratio'])} | {'MET' if r['met'] else 'MISSED'} |")
    missed = [r for r in report["layers"] if not r["met"]]
    lines += ["", f"**{len(report['layers']) - len(missed)} of {len(report['layers'])} layer/curvature "
                  f"pairs MET the target.**", ""]
    if missed:
        lines += ["## Mispredictions (predicted cost ratio vs measured time ratio, auto's pick over the fastest)",
                  ""]
        for r in missed:
            pick = max(r["auto_picks"], key=r["auto_picks"].get)
            pc = r["predicted_cost"]
            pm = r["cost_at_measured_iters"]
            iters = r["candidates"].get("cg", {}).get("iters")
            lines.append(f"- {r['config']} {r['layer']} ({r['curvature']}): picked {pick}, fastest {r['fastest']}; "
                         f"predicted {pick}/{r['fastest']} = {_fmt(pc[pick] / pc[r['fastest']])} with k = "
                         f"{r['k_predicted']} ({_fmt(pm[pick] / pm[r['fastest']])} at the measured "
                         f"{_fmt(iters, 2)} iterations), measured {_fmt(r['ratio'])}; predicted multiply-adds: "
                         + ", ".join(f"{m} {v:.3g}" for m, v in pc.items()))
        lines.append("")
    lines += ["## Cost-model fit: time ≈ α·cost + β·calls", "",
              "| candidate | points | α (ns / multiply-add) | β (µs / call) | scale = α/α(kron-cg) "
              "| overhead (multiply-adds / call) | rms rel. error |", "|---" * 7 + "|"]
    for key, f in report["calibration_fit"].items():
        lines.append(f"| {key} | {f['points']} | {_fmt(f['alpha'] * 1e9)} | {_fmt(f['beta'] * 1e6)} "
                     f"| {_fmt(f['scale'])} | {_fmt(f['overhead_macs'])} | {_fmt(f['rms_rel_error'], 2)} |")
    n = len(report["layers"])
    lines += ["", f"Choosing by the fitted times would meet the target on {report['replay']['library_k']} of {n} "
                  f"pairs with the library's assumed CG iterations, {report['replay']['measured_k']} of {n} with "
                  "the measured ones (in-sample: the fit was made on these same measurements).", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", type=parse_configs, default=parse_configs(CONFIGS),
                        help=f"comma-separated model:batch (models {sorted(INPUT_SHAPES)}; default {CONFIGS})")
    parser.add_argument("--steps", type=int, default=3, help="timed batches after an untimed first one")
    parser.add_argument("--damping", type=float, default=None, help="λ (default: CGFAC's)")
    parser.add_argument("--cg-tol", type=float, default=None, help="CG tolerance (default: CGFAC's)")
    parser.add_argument("--cg-max-iters", type=int, default=None, help="CG iteration cap (default: CGFAC's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch (median)")
    parser.add_argument("--time-budget", type=float, default=5.0,
                        help="stop repeating once this many seconds of timed calls are spent")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="a call longer than this ends that candidate's batches")
    parser.add_argument("--max-memory-gb", type=float, default=4.0, help="skip candidates estimated above this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("runs/choice"), help="output directory")


def choice_layers(pre: CGFAC) -> list[str]:
    """The blocks with a choice of solver (dense rows; closed-form blocks have none)."""
    return [name for name, helper in pre.layers.items() if helper.structure == "kron"]


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("cgfac-bench choice: --steps and --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    pre_kwargs = {k: v for k, v in (("damping", args.damping), ("cg_tol", args.cg_tol),
                                     ("cg_max_iters", args.cg_max_iters)) if v is not None}
    calib = calibrate(str(torch.empty(0, device=device).device), torch.float32)
    bench = ChoiceBench(args, device)
    captured = [(task, batch, *capture(task, batch, args.steps, pre_kwargs, args.seed, device))
                for task, batch in args.configs]
    total = sum(len(choice_layers(pre)) * len(CANDIDATES) for _, _, pre, _ in captured)
    layers = []
    with tqdm(total=total, desc="choice", unit="layer") as bar:
        for task, batch, pre, batches in captured:
            for name in choice_layers(pre):
                for curvature in CANDIDATES:
                    bar.set_postfix_str(f"{task}:{batch} {name} {curvature}")
                    rec = bench.layer(pre, name, curvature, [b[name] for b in batches], calib)
                    layers.append({"config": f"{task}:{batch}", **rec})
                    bar.update()
    report: dict[str, Any] = {"machine": machine_info(device), "calibration": dataclasses.asdict(calib),
                              "settings": {"configs": [f"{t}:{b}" for t, b in args.configs], "steps": args.steps,
                                           "repeats": args.repeats, "time_budget": args.time_budget,
                                           "damping": captured[0][2].damping(0), "cg_tol": captured[0][2].cg_tol(0),
                                           "cg_max_iters": captured[0][2].cg_max_iters,
                                           "max_memory_gb": args.max_memory_gb},
                              "layers": layers, "calibration_fit": calibration_fit(layers)}
    report["replay"] = {"library_k": replay(layers, report["calibration_fit"], measured_k=False),
                        "measured_k": replay(layers, report["calibration_fit"], measured_k=True)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "choice.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "choice.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'choice.json'}, {args.out / 'choice.md'}")
    return 0
