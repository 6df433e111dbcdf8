"""The comparison of a ``cgfac-bench train`` invocation's runs: configurations over seeds, each
optimizer's best, times to a target loss, and the LM's held-out race; plus the JSON-safe copy of
the record."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cgfac_bench.hyper import PEERS


def _usable(run: dict[str, Any]) -> bool:
    return "error" not in run and not run["diverged"] and math.isfinite(run["final_train_loss"])


def config_key(run: dict[str, Any]) -> tuple[str, float, float | None]:
    """A run's configuration: optimizer, learning rate and (second-order methods) damping."""
    return run["optimizer"], run["lr"], run.get("damping") if run["optimizer"] not in PEERS else None


def _score(run: dict[str, Any]) -> float:
    return run["final_train_loss"] if _usable(run) else math.inf


def configs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by :func:`config_key` over seeds: final losses, median, spread, median run.

    A configuration with a diverged or failed seed scores ``inf`` for that seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    out = []
    for (name, lr, damping), members in groups.items():
        scores = sorted(_score(r) for r in members)
        median = float(np.median(scores)) if all(map(math.isfinite, scores)) else (
            scores[(len(scores) - 1) // 2])
        ordered = sorted(members, key=_score)
        out.append({"optimizer": name, "lr": lr, "damping": damping, "seeds": [r.get("seed") for r in members],
                    "final_losses": [_score(r) for r in members], "median": median,
                    "min": scores[0], "max": scores[-1], "median_run": ordered[(len(ordered) - 1) // 2],
                    "members": members})
    return out


def best_configs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: its configuration (:func:`configs`) with the lowest median final training loss."""
    best: dict[str, dict[str, Any]] = {}
    for cfg in configs(runs):
        name, current = cfg["optimizer"], best.get(cfg["optimizer"])
        if current is None or cfg["median"] < current["median"]:
            best[name] = cfg
    return best


def best_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: the median-seed run of its configuration with the lowest median final
    training loss (a single seed: the run itself); an optimizer whose runs all failed gives its first run.

    (In the record, ``best`` maps each optimizer to its best run's index in ``runs``.)"""
    return {name: cfg["median_run"] for name, cfg in best_configs(runs).items()}


def heldout_times(runs: Sequence[dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """The LM's held-out race against ``reference``, per optimizer's best configuration and seed.

    For each seed ``s`` that both ran: ``target[s]`` is the reference's final held-out loss (the last
    point of its ``heldout_curve``), ``seconds[s]`` the training time at which the optimizer's
    held-out curve first reaches it (interpolated; None: not reached), and ``ratio[s]`` that time
    over the reference's own time to it (≈ its budget). ``median_ratio`` counts a miss as ``inf``.
    Empty when the reference has no usable run."""
    best = best_configs(runs)
    if reference not in best:
        return {}
    ref_runs = {r.get("seed"): r for r in best[reference]["members"] if _usable(r) and r.get("heldout_curve")}
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in best.items():
        seeds, targets, seconds, ratios = [], [], [], []
        for run in cfg["members"]:
            ref = ref_runs.get(run.get("seed"))
            if ref is None or "error" in run:
                continue
            target = ref["heldout_curve"][-1][2]
            t, t_ref = time_to_interpolated(run, target, "heldout_curve"), time_to_interpolated(ref, target,
                                                                                               "heldout_curve")
            seeds.append(run.get("seed"))
            targets.append(target)
            seconds.append(t)
            ratios.append(t / t_ref if t is not None and t_ref else None)
        if seeds:
            out[name] = {"seeds": seeds, "target": targets, "seconds": seconds, "ratio": ratios,
                         "median_ratio": float(np.median([math.inf if r is None else r for r in ratios]))}
    return out


def best_peer_heldout(runs: Sequence[dict[str, Any]]) -> str | None:
    """The peer whose best configuration ends with the lowest median held-out loss (None: no peer ran)."""
    finals = {name: float(np.median([r["heldout_curve"][-1][2] for r in cfg["members"]
                                     if _usable(r) and r.get("heldout_curve")] or [math.inf]))
              for name, cfg in best_configs(runs).items() if name in PEERS}
    finals = {k: v for k, v in finals.items() if math.isfinite(v)}
    return min(finals, key=finals.__getitem__) if finals else None


def adam_target(runs: Sequence[dict[str, Any]]) -> float | None:
    """The lowest training loss any Adam run reached at an evaluation, None without one."""
    losses = [c[2] for r in runs if r["optimizer"] == "adam" and "error" not in r for c in r["curve"]
              if math.isfinite(c[2])]
    return min(losses) if losses else None


def time_to(run: dict[str, Any], target: float | None) -> float | None:
    """Training seconds of the first evaluation at or below ``target`` (None: not reached)."""
    if target is None or "error" in run:
        return None
    return next((t for t, _, loss in run["curve"] if loss <= target), None)


def loss_at(run: dict[str, Any], seconds: float) -> float | None:
    """The training loss at ``seconds`` of training, linear between evaluations (None: not reached)."""
    curve = run.get("curve", [])
    for (t0, _, l0), (t1, _, l1) in itertools.pairwise(curve):
        if t0 <= seconds <= t1 and math.isfinite(l0) and math.isfinite(l1):
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return None


def time_to_interpolated(run: dict[str, Any], target: float | None, key: str = "curve") -> float | None:
    """Training seconds at which the loss of ``run[key]`` (the training-loss curve, or the LM's
    ``"heldout_curve"``) first reaches ``target``, linear between evaluations."""
    if target is None or "error" in run:
        return None
    curve = run.get(key, [])
    if curve and curve[0][2] <= target:
        return curve[0][0]
    for (t0, _, l0), (t1, _, l1) in itertools.pairwise(curve):
        if math.isfinite(l1) and l1 <= target:
            return t1 if not (math.isfinite(l0) and l0 > l1) else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def finite_json(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
