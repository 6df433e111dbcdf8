"""Language-model benchmark on the field's conventions: nanoGPT's character-level GPT, step-based runs.

``cgfac-bench train --task nanogpt-s`` (or ``nanogpt-m``) dispatches here.

Task (:data:`LM_TASKS`): :class:`cgfac_bench.models.NanoGPT` (pre-LayerNorm blocks, GELU MLP ×4, tied
token embedding and head, learned positions, no bias, no dropout) on English prose this machine has
(:func:`cgfac_bench.data.load_prose_chars`: the help topics and the standard library's docstrings,
98 symbols, every tenth document held out); loss in nats per character.

* size S, nanoGPT's published CPU configuration: 4 layers, 4 heads, width 128, context 64, batch 12,
  2000 iterations;
* size M: width 256, 3000 iterations, otherwise the same.

Every run: the model built after ``torch.manual_seed(seed)``, batches of random windows from a
generator seeded by ``seed`` (nanoGPT's ``get_batch``), a linear warm-up over ``warmup`` iterations
then cosine decay to a tenth of each group's learning rate at the last iteration (nanoGPT's
schedule, for every optimizer), gradients clipped to norm 1.0. The clock counts training
iterations only. Every ``eval_interval`` iterations, off the clock, the held-out loss on the same
``eval_windows`` fixed held-out windows (``heldout_curve``: rows of training seconds, step, loss);
at the end the held-out loss on ``final_windows`` windows (``final_heldout``).

Optimizers (:func:`make_lm_optimizer`; ``lr`` and ``wd`` per run, ``--hyper`` for the rest):

* ``adamw-published``: nanoGPT's recipe as published, lr 1e-3, β (0.9, 0.99), weight decay 0.1 on
  parameters of ≥ 2 dimensions (the grid does not apply);
* ``adamw``: the same with ``lr`` and ``wd`` tuned;
* ``muon``: ``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``, one lr) on the hidden matrices
  (:func:`cgfac.optim.hidden_matrices`), AdamW (β (0.9, 0.99), wd on ≥ 2-D) on the rest;
  ``muon-original``: Muon's own scaling, the rest at ``adamw_lr`` (hyper, default 3e-3); ``muon-f32``:
  the same update as ``muon`` with Newton–Schulz in float32 (:class:`cgfac.optim.TransformerKFAC` with
  ``power=0``, ``ns_form="plain"``: torch.optim.Muon's Newton–Schulz as it computes it, unless
  ``--hyper ns_form=gram``): torch.optim.Muon runs it in bfloat16, which a CPU without bfloat16 units emulates;
* ``soap``: ``pytorch_optimizer.SOAP``; ``kron``: PSGD Kron (``kron_torch.Kron``), if installed;
* ``tkfac-*``: :class:`cgfac.optim.TransformerKFAC` candidates (:data:`TKFAC_VARIANTS`).

Tuning: every (optimizer, lr, wd, seed) of the grids at the full horizon; ``--jobs`` runs that many
at once (one thread each unless ``--threads``): for tuning, where only the losses count. Timed
comparisons run one at a time. The best configuration of an optimizer is the one with the lowest
median final held-out loss over its seeds.

Report (``results.md``): per optimizer its best configuration's final held-out loss (median [min,
max] over seeds), ms/step, optimizer state; per seed the steps and seconds each needs to reach
tuned Muon's and tuned AdamW's final held-out loss (interpolated along the held-out curve), as
ratios to theirs; plots of held-out loss against steps and time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cgfac
from cgfac_bench.data import PROSE_VOCAB, load_prose_chars
from cgfac_bench.machine import machine_info
from cgfac_bench.models import NanoGPT
from cgfac_bench.peers import CombinedOptimizer


@dataclass(frozen=True)
class LMTask:
    """One size of the nanoGPT benchmark."""

    width: int
    depth: int = 4
    heads: int = 4
    context: int = 64
    batch: int = 12
    iters: int = 2000
    warmup: int = 100
    eval_interval: int = 100
    eval_windows: int = 256
    final_windows: int = 2048
    experts: int = 0  # > 0: every MLP a mixture of this many experts (top 2, cgfac_bench.models.NanoMoE)
    aux_weight: float = 0.01  # the load-balancing loss's weight in the training loss (experts > 0)


LM_TASKS = {"nanogpt-s": LMTask(width=128), "nanogpt-m": LMTask(width=256, iters=3000, eval_interval=150),
            "nanogpt-moe-s": LMTask(width=128, experts=4)}
LM_PEERS = ("adamw-published", "adamw", "muon", "muon-f32", "muon-original", "soap", "kron")
# The TransformerKFAC candidates of the transformers issue (cgfac.optim.TransformerKFAC's arguments):
# (a) precondition, then orthogonalise (input side; both sides; fresh low-rank rows), (b) EKFAC,
# (c) fractional powers; (a)+(b) EKFAC's direction orthogonalised (SOAP-Muon with K-FAC's factors);
# "spectral": steepest descent under K-FAC's metric and the spectral norm (Cholesky whitening around NS);
# "newton": Newton-Muon's p = -1 (Cholesky, no eigh). Their damping 0.3: benchmarks/tuning-nanogpt-s-cholesky.
TKFAC_VARIANTS: dict[str, dict[str, Any]] = {
    "tkfac-ortho-input": {"direction": "ortho", "sides": "input", "power": -0.5},
    "tkfac-ortho-both": {"direction": "ortho", "sides": "both", "power": -0.25},
    "tkfac-ortho-smaller": {"direction": "ortho", "sides": "smaller", "power": -0.5},
    "tkfac-ortho-rows": {"direction": "ortho", "sides": "input", "power": -0.5, "factors": "rows", "rows": 64},
    "tkfac-ekfac": {"direction": "ekfac", "sides": "both", "eig_every": 10},
    "tkfac-ekfac-ortho": {"direction": "ekfac-ortho", "sides": "both", "eig_every": 10},
    "tkfac-power": {"direction": "power", "sides": "both", "power": -0.5},
    "tkfac-spectral": {"direction": "spectral", "sides": "input", "damping": 0.3},
    "tkfac-newton": {"direction": "ortho", "sides": "input", "power": -1.0, "damping": 0.3},
}
LM_OPTIMIZERS = LM_PEERS + tuple(TKFAC_VARIANTS)
HYPER_TAKERS = ("soap", "kron", "muon-original", "muon-f32", *TKFAC_VARIANTS)  # --hyper goes to these
PUBLISHED = {"lr": 1e-3, "wd": 0.1}  # nanoGPT's shakespeare_char recipe
ADAMW_BETAS = (0.9, 0.99)
CLIP = 1.0
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw-published": (1e-3,), "adamw": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), "muon": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "muon-f32": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "muon-original": (0.01, 0.02, 0.04, 0.08, 0.16), "soap": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "kron": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3), **{n: (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2) for n in TKFAC_VARIANTS},
}
WD_GRID: dict[str, tuple[float, ...]] = {name: (0.1,) for name in LM_OPTIMIZERS}
# Each optimizer's tuned lr, wd and hyper on a task (benchmarks/tuning-nanogpt-*, commands in run_all.sh).
# nanogpt-s, 2000 iterations, one seed, final held-out loss (nats/char):
#   AdamW lr {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2}: 1.780, 1.681, 1.624, 1.643, 1.792
#   Muon (float32 NS) {2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2}: 1.460, 1.436, 1.434, 1.473, 1.532
#   TransformerKFAC ortho-input (p = -1/2, λ 0.03) {2e-3, 4e-3, 8e-3, 1.6e-2}: 1.453, 1.415, 1.425, 1.445;
#     at 4e-3: p = -1 (Newton-Muon) 1.421, λ 0.1 1.421, 128 rows per layer 1.416 (kept: cheaper)
#   TransformerKFAC ekfac-ortho {2e-3, 4e-3, 8e-3}: 1.445, 1.409, 1.424
#   SOAP and plain EKFAC: benchmarks/tuning-nanogpt-s-2
#   refresh periods at 4e-3 (benchmarks/tuning-nanogpt-s-steps): factor_every=eig_every=10, 128 rows 1.418
#   (one d×d power per layer: 1.28x AdamW's state) against 1.416 above; kept in the round-3 runs
# nanogpt-m, 2000 iterations, one seed (benchmarks/tuning-nanogpt-m): AdamW {5e-4, 1e-3, 2e-3}: 1.611, 1.562,
#   1.599; Muon {2e-3, 4e-3, 8e-3}: 1.390, 1.383, 1.401; TransformerKFAC 10/10, 128 rows {1e-3, 2e-3, 4e-3}:
#   1.387, 1.374, 1.373. nanogpt-moe-s: size S's rates (benchmarks/train-nanogpt-moe-s).
# Round 6 (benchmarks/tuning-nanogpt-*-round6; time to Muon's final = steps x interleaved step ratio,
# benchmarks/speed-nanogpt-round6): low-rank running factors. S, lr 4e-3, seed 0: rank=128 1.423 (0.93 of
#   Muon's steps), rank=64 1.425 (0.93; step 1.07x Muon's against the dense 1.20x: kept; lr 2e-3 / 8e-3:
#   1.456 / 1.426; damping 0.01 / 0.1: 1.429 / 1.425); sides="smaller"
#   1.431 (4e-3), 1.439 (8e-3). M: rank=256 1.376 (0.96; step 1.09x against 1.27x: kept), rank=128 1.380.
#   The tuned tkfac-ortho-input below is the kept low-rank setting (rounds 2-4 ran it without rank).
# Round 7 (benchmarks/tuning-nanogpt-s-ns): fewer Newton-Schulz iterations, S, seed 0, rank=64 at 4e-3
#   (against 5: 1.425; Muon 1.434): ns_steps=4 1.431, 3 1.445; Muon itself 1.445 (4), 1.466 (3). The
#   preconditioned momentum needs fewer iterations than Muon's. At S, 3 seeds, 4 iterations save 5% of
#   the step and reach Muon's final in 0.98x its time (5: 0.99x), but end behind it (1.437 against 1.434;
#   5: 1.425): 5 kept at S. M (benchmarks/train-nanogpt-m-ns4-3seeds, 3 seeds): ns_steps=4 1.375 against
#   1.372, 0.95 of Muon's steps against 0.93, step 1.02x Muon's against 1.10x (speed-nanogpt-round7), so
#   0.97x Muon's time against 1.02x: kept at M. Muon at M with 4: 1.392 against 1.387.
# Round 8 (benchmarks/tuning-nanogpt-s-round8, train-nanogpt-m-round8, speed-nanogpt-round8): Newton-Schulz
#   in Gram form (TransformerKFAC's default ns_form="auto"; the same maths) cuts the step to 1.00x Muon's
#   at S and 0.89x at M (plain form: 1.08x, 1.01x); muon-f32 keeps torch.optim.Muon's plain form. Polar
#   Express coefficients (S, seed 0): ours 1.431 (5), 1.430 (4); Muon 1.443 (5), 1.443 (4): Jordan's kept.
TUNED_LM: dict[str, dict[str, dict[str, Any]]] = {
    "nanogpt-s": {"adamw-published": {"lr": 1e-3, "wd": 0.1}, "adamw": {"lr": 4e-3, "wd": 0.1},
                  "muon-f32": {"lr": 8e-3, "wd": 0.1},
                  "tkfac-ortho-input": {"lr": 4e-3, "wd": 0.1,
                                        "hyper": {"rows": 128, "factor_every": 10, "eig_every": 10, "rank": 64}},
                  "tkfac-ekfac-ortho": {"lr": 4e-3, "wd": 0.1}},
    "nanogpt-m": {"adamw-published": {"lr": 1e-3, "wd": 0.1}, "adamw": {"lr": 1e-3, "wd": 0.1},
                  "muon-f32": {"lr": 4e-3, "wd": 0.1},
                  "tkfac-ortho-input": {"lr": 4e-3, "wd": 0.1,
                                        "hyper": {"rows": 128, "factor_every": 10, "eig_every": 10, "rank": 256,
                                                  "ns_steps": 4}}},
    "nanogpt-moe-s": {"adamw": {"lr": 4e-3, "wd": 0.1}, "muon-f32": {"lr": 8e-3, "wd": 0.1},
                      "tkfac-ortho-input": {"lr": 4e-3, "wd": 0.1,
                                            "hyper": {"rows": 128, "factor_every": 10, "eig_every": 10}}},
}


# --- optimizers ----------------------------------------------------------------------------------
def _adamw_groups(params: Sequence[nn.Parameter], lr: float, wd: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": wd},
                        {"params": rest, "lr": lr, "weight_decay": 0.0}) if g["params"]]


def make_lm_optimizer(name: str, model: nn.Module, lr: float, wd: float,
                      hyper: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`LM_OPTIMIZERS` over ``model``'s parameters (module docstring)."""
    hyper = dict(hyper or {})
    params = [p for p in model.parameters() if p.requires_grad]
    if name in ("adamw", "adamw-published"):
        return torch.optim.AdamW(_adamw_groups(params, lr, wd), lr=lr, betas=ADAMW_BETAS)
    if name in ("muon", "muon-original"):
        hidden_layers, rest = cgfac.optim.hidden_matrices(model)
        original = name == "muon-original"
        weights: list[Tensor] = [cast(Tensor, m.weight) for _, m in hidden_layers]
        muon = torch.optim.Muon(weights, lr=lr, weight_decay=wd,
                                adjust_lr_fn="original" if original else "match_rms_adamw")
        rest_lr = float(hyper.get("adamw_lr", 3e-3)) if original else lr
        adamw = torch.optim.AdamW(_adamw_groups(rest, rest_lr, wd), lr=rest_lr, betas=ADAMW_BETAS)
        return CombinedOptimizer([muon, adamw])
    if name == "soap":
        import pytorch_optimizer

        return pytorch_optimizer.SOAP(params, lr=lr, weight_decay=wd, **hyper)
    if name == "kron":
        try:
            import kron_torch
        except ImportError:
            raise RuntimeError("kron needs kron-torch: pip install kron-torch") from None
        return kron_torch.Kron(params, lr=lr, weight_decay=wd, **hyper)
    if name == "muon-f32":  # Muon computed in float32: TransformerKFAC with P = I is Muon's update exactly
        return cgfac.optim.TransformerKFAC(model, lr=lr, weight_decay=wd, direction="ortho", power=0.0,
                                           ns_dtype=torch.float32, **{"ns_form": "plain", **hyper})
    if name in TKFAC_VARIANTS:
        return cgfac.optim.TransformerKFAC(model, lr=lr, weight_decay=wd, **{**TKFAC_VARIANTS[name], **hyper})
    raise ValueError(f"optimizer must be one of {LM_OPTIMIZERS}, got {name!r}")


def lr_factor(it: int, task: LMTask) -> float:
    """nanoGPT's schedule as a multiple of the peak: ``(it+1)/(warmup+1)`` while warming up, then cosine
    from 1 to 0.1 at the last iteration."""
    if it < task.warmup:
        return (it + 1) / (task.warmup + 1)
    progress = min(1.0, (it - task.warmup) / max(1, task.iters - task.warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (nested containers included, each tensor once)."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, Mapping):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return sum(walk(getattr(obj, s)) for s in getattr(obj, "__slots__", ()) if hasattr(obj, s))

    parts = getattr(opt, "optimizers", [opt])
    return sum(walk(dict(o.state)) for o in parts)


# --- one run -------------------------------------------------------------------------------------
def _windows(stream: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)
    w = stream[idx].long()
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def heldout_loss(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 128) -> float:
    """Mean next-character cross-entropy (nats) over every position of ``x``, the model in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        out = model(x[i : i + chunk])
        total += F.cross_entropy(out.reshape(-1, out.shape[-1]), y[i : i + chunk].reshape(-1)).item() * out.shape[0]
    model.train()
    return total / x.shape[0]


def lm_run(cfg: dict[str, Any], data: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Train one (optimizer, lr, wd, seed) of ``cfg`` for the task's iterations; the run's record."""
    torch.set_num_threads(cfg["threads"])
    task = LM_TASKS[cfg["task"]]
    if data is None:
        data = torch.load(cfg["data_path"], weights_only=True)
    device = torch.device(cfg.get("device", "cpu"))
    train, test = data["train"].to(device), data["test"].to(device)
    fixed = torch.Generator().manual_seed(1234)  # the same held-out windows for every run
    held = torch.randint(0, test.numel() - task.context - 1, (task.final_windows,), generator=fixed).to(device)
    final_x, final_y = _windows(test, held, task.context)
    eval_x, eval_y = final_x[: task.eval_windows], final_y[: task.eval_windows]
    iters = cfg.get("iters") or task.iters
    task = LMTask(**{**task.__dict__, "iters": iters})
    torch.manual_seed(cfg["seed"])
    model = NanoGPT(PROSE_VOCAB, task.context, task.width, task.depth, task.heads, task.experts).to(device)
    opt = make_lm_optimizer(cfg["optimizer"], model, cfg["lr"], cfg["wd"], cfg.get("hyper"))
    base_lrs = [g["lr"] for g in opt.param_groups]
    order = torch.Generator().manual_seed(cfg["seed"])
    elapsed, curve, heldout_curve, diverged = 0.0, [], [], False
    train_losses: list[float] = []
    for it in range(iters + 1):
        if it % task.eval_interval == 0 or it == iters:
            loss_now = heldout_loss(model, eval_x, eval_y)
            heldout_curve.append((elapsed, it, loss_now))
            if train_losses:
                curve.append((elapsed, it, statistics.fmean(train_losses[-task.eval_interval:])))
            if not math.isfinite(loss_now):
                diverged = True
                break
        if it == iters:
            break
        t0 = time.perf_counter()
        starts = torch.randint(0, train.numel() - task.context - 1, (task.batch,), generator=order).to(device)
        xb, yb = _windows(train, starts, task.context)
        factor = lr_factor(it, task)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        out = model(xb)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
        (loss + task.aux_weight * model.aux_loss() if task.experts else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        train_losses.append(value)
        if not math.isfinite(value):
            diverged = True
            heldout_curve.append((elapsed, it + 1, math.inf))
            break
    steps = heldout_curve[-1][1]
    final = heldout_loss(model, final_x, final_y) if not diverged else math.inf
    return {"optimizer": cfg["optimizer"], "lr": cfg["lr"], "wd": cfg["wd"], "seed": cfg["seed"],
            "hyper": cfg.get("hyper") or {}, "steps": steps, "train_seconds": elapsed,
            "ms_per_step": 1000 * elapsed / max(1, steps), "diverged": diverged, "final_heldout": final,
            "heldout_curve": heldout_curve, "curve": curve, "state_bytes": state_bytes(opt),
            "params": sum(p.numel() for p in model.parameters())}


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    try:
        return lm_run(cfg)
    except Exception as err:  # reported instead of ending the comparison
        return {"optimizer": cfg["optimizer"], "lr": cfg["lr"], "wd": cfg["wd"], "seed": cfg["seed"],
                "hyper": cfg.get("hyper") or {}, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}


# --- analysis ------------------------------------------------------------------------------------
def config_key(run: Mapping[str, Any]) -> str:
    hyper = ",".join(f"{k}={v}" for k, v in sorted(run.get("hyper", {}).items()))
    return f"{run['optimizer']} lr={run['lr']:g} wd={run['wd']:g}" + (f" {hyper}" if hyper else "")


def best_configs(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Per optimizer, the runs (one per seed) of its configuration with the lowest median final held-out loss."""
    by_config: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            by_config.setdefault(config_key(r), []).append(r)
    best: dict[str, list[Mapping[str, Any]]] = {}
    for members in by_config.values():
        name = members[0]["optimizer"]
        score = statistics.median(m["final_heldout"] for m in members)
        if name not in best or score < statistics.median(m["final_heldout"] for m in best[name]):
            best[name] = sorted(members, key=lambda m: m["seed"])
    return best


def reach(run: Mapping[str, Any], target: float) -> tuple[float, float] | None:
    """``(step, seconds)`` at which the held-out curve first reaches ``target``, interpolated linearly
    between evaluations; None if it never does."""
    prev = None
    for seconds, step, loss in run["heldout_curve"]:
        if loss <= target:
            if prev is None or prev[2] == loss:
                return float(step), float(seconds)
            f = (prev[2] - target) / (prev[2] - loss)
            return prev[1] + f * (step - prev[1]), prev[0] + f * (seconds - prev[0])
        prev = (seconds, step, loss)
    return None


def race(best: Mapping[str, Sequence[Mapping[str, Any]]], reference: str) -> dict[str, dict[str, Any]]:
    """Per optimizer and seed: steps and seconds to the reference's final held-out loss of that seed,
    as ratios to the reference's own steps and seconds (None: not reached)."""
    ref = {r["seed"]: r for r in best.get(reference, [])}
    out: dict[str, dict[str, Any]] = {}
    for name, runs in best.items():
        steps, times = [], []
        for r in runs:
            base = ref.get(r["seed"])
            if base is None:
                continue
            hit = reach(r, base["heldout_curve"][-1][2])
            steps.append(None if hit is None else hit[0] / base["steps"])
            times.append(None if hit is None else hit[1] / base["train_seconds"])
        out[name] = {"steps_ratio": steps, "time_ratio": times}
    return out


def _median(values: Sequence[float | None]) -> float | None:
    """The median, counting an unreached target (None) as +∞; None if that is the median."""
    vals = sorted(math.inf if v is None else v for v in values)
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def _spread(values: Sequence[float | None], spec: str = ".3f") -> str:
    if not values:
        return "–"
    med = _median(values)
    lo = min((v for v in values if v is not None), default=None)
    hi = max(math.inf if v is None else v for v in values)

    def fmt(v: float | None) -> str:
        return "not reached" if v is None or math.isinf(v) else format(v, spec)

    return f"{fmt(med)} [{fmt(lo)}, {fmt(hi)}]" if len(values) > 1 else fmt(med)


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    best = best_configs(runs)
    muon = min((n for n in ("muon", "muon-f32", "muon-original") if n in best),
               key=lambda n: statistics.median(r["final_heldout"] for r in best[n]), default=None)
    summary: dict[str, Any] = {"best": {n: config_key(rs[0]) for n, rs in best.items()}, "muon": muon}
    summary["to_muon"] = race(best, muon) if muon else {}
    summary["to_adamw"] = race(best, "adamw") if "adamw" in best else {}
    return summary


def write_markdown(path: Path, record: Mapping[str, Any]) -> None:
    runs = record["runs"]
    best = best_configs(runs)
    summary = record["summary"]
    task = record["settings"]["task"]
    lines = [f"# {task}: held-out loss (nats/char) after {record['settings']['iters']} iterations", "",
             f"Command: `{record['command']}`  ", f"Machine: {record['machine'].get('cpu_model')}, "
             f"{record['machine'].get('threads')} threads per run, torch {record['machine'].get('torch')}, "
             f"device {record['machine'].get('device')}", "",
             "| optimizer | best configuration | seeds | final held-out | ms/step | state MiB |"
             " steps to Muon's | time to Muon's | steps to AdamW's | time to AdamW's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = sorted(best, key=lambda n: statistics.median(r["final_heldout"] for r in best[n]))
    for name in order:
        rs = best[name]
        tm, ta = summary["to_muon"].get(name, {}), summary["to_adamw"].get(name, {})
        lines.append(
            f"| {name} | {config_key(rs[0]).split(' ', 1)[1]} | {len(rs)} | "
            f"{_spread([r['final_heldout'] for r in rs])} | {statistics.median(r['ms_per_step'] for r in rs):.1f} | "
            f"{statistics.median(r['state_bytes'] for r in rs) / 2**20:.2f} | "
            f"{_spread(tm.get('steps_ratio', []), '.2f')} | {_spread(tm.get('time_ratio', []), '.2f')} | "
            f"{_spread(ta.get('steps_ratio', []), '.2f')} | {_spread(ta.get('time_ratio', []), '.2f')} |")
    lines += ["", "Final held-out: median [min, max] over seeds, on "
              f"{LM_TASKS[task].final_windows} fixed held-out windows. Ratios: per seed, the steps (time) "
              "an optimizer's best configuration needs to reach the reference's final held-out loss of "
              "the same seed, over the reference's steps (time); median [min, max]. Muon = the best of "
              f"`muon`, `muon-f32` and `muon-original` ({summary.get('muon')}).", "", "## Every configuration", "",
              "| configuration | seed | final held-out | ms/step | diverged |", "|---|---:|---:|---:|---|"]
    for r in sorted(runs, key=lambda r: (r["optimizer"], config_key(r), r["seed"])):
        if "error" in r:
            lines.append(f"| {config_key(r)} | {r['seed']} | error: {r['error'][:80]} | – | – |")
        else:
            lines.append(f"| {config_key(r)} | {r['seed']} | {r['final_heldout']:.4f} | {r['ms_per_step']:.1f} | "
                         f"{r['diverged']} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, record: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_configs(record["runs"])
    plots = ((1, "iteration", "heldout_vs_steps.png"), (0, "training seconds", "heldout_vs_time.png"))
    for axis, label, fname in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rs in sorted(best.items()):
            r = sorted(rs, key=lambda r: r["final_heldout"])[len(rs) // 2]  # the median seed
            pts = [(c[axis], c[2]) for c in r["heldout_curve"] if math.isfinite(c[2])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{name} ({r['final_heldout']:.3f})")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/char)")
        finals = [r["final_heldout"] for rs in best.values() for r in rs if math.isfinite(r["final_heldout"])]
        if finals:
            ax.set_ylim(min(finals) - 0.05, min(finals) + 1.0)
        ax.set_title(f"{record['settings']['task']}: best configuration of each optimizer (median seed)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


# --- command line (through cgfac-bench train) ----------------------------------------------------
def parse_values(text: str | None, optimizers: Sequence[str], defaults: Mapping[str, Sequence[float]],
                 flag: str) -> dict[str, list[float]]:
    """``defaults`` for ``optimizers``, overridden by ``"1e-3,2e-3"`` (all) or ``"adamw=1e-3;muon=0.02"``."""
    grid = {name: list(defaults[name]) for name in optimizers}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        names, _, values = part.rpartition("=")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"{flag}: {part!r} is not NAME=V1,V2 or V1,V2") from None
        for name in ([names.strip()] if names else list(optimizers)):
            if name not in grid:
                raise SystemExit(f"{flag}: {name!r} is not among the optimizers {list(optimizers)}")
            grid[name] = parsed
    return grid


def parse_lm_hyper(text: str | None) -> dict[str, Any]:
    """``"key=value,..."`` with numbers, None and strings (``cgfac.optim.TransformerKFAC``'s keywords)."""
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hyper: {item!r} is not key=value")
        value = value.strip()
        if value.lower() == "none":
            out[key.strip()] = None
            continue
        try:
            number = float(value)
            out[key.strip()] = int(number) if value.lstrip("-").isdigit() else number
        except ValueError:
            out[key.strip()] = value
    return out


def _configs(args: argparse.Namespace, task: LMTask) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run of the command's grid, and the grid's settings for the record."""
    tuned = TUNED_LM.get(args.task, {}) if args.tuned else {}
    listed = args.optimizers or ",".join(tuned or ("adamw-published", "adamw", "muon"))
    optimizers = [o.strip() for o in listed.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in LM_OPTIMIZERS]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {','.join(LM_OPTIMIZERS)}")
    lr_defaults = {n: (tuned[n]["lr"],) if n in tuned else LR_GRID[n] for n in LM_OPTIMIZERS}
    wd_defaults = {n: (tuned[n]["wd"],) if n in tuned else WD_GRID[n] for n in LM_OPTIMIZERS}
    lrs = parse_values(args.lr_grid, optimizers, lr_defaults, "--lr-grid")
    wds = parse_values(args.wd_grid, optimizers, wd_defaults, "--wd-grid")
    for name in ("adamw-published",):
        if name in lrs:
            lrs[name], wds[name] = [PUBLISHED["lr"]], [PUBLISHED["wd"]]
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    hypers = [parse_lm_hyper(alt) for alt in (args.hyper or "").split("|")]  # "a=1|a=2": one config each
    jobs = max(1, args.jobs)
    threads = args.threads or (1 if jobs > 1 else torch.get_num_threads())
    iters = args.iters or task.iters
    cfgs = [{"task": args.task, "optimizer": n, "lr": lr, "wd": wd, "seed": s, "iters": iters, "threads": threads,
             "device": args.device, "hyper": {**tuned.get(n, {}).get("hyper", {}), **hyper}}
            for n in optimizers for hyper in (hypers if n in HYPER_TAKERS else [{}])
            for lr in lrs[n] for wd in wds[n] for s in seeds]
    if args.from_runs and not args.optimizers:
        cfgs = []  # only the report of the recorded runs
    settings = {"task": args.task, **task.__dict__, "iters": iters, "jobs": jobs, "threads": threads,
                "seeds": seeds, "lr_grid": lrs, "wd_grid": wds}
    return cfgs, settings


def _run_all(cfgs: list[dict[str, Any]], jobs: int, out: Path, desc: str) -> list[dict[str, Any]]:
    """Each config in a fresh spawned process, ``jobs`` at a time; each record appended to
    ``out/runs.jsonl`` as it finishes."""
    from tqdm import tqdm

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cgfac-lm-") as tmp:
        data_path = Path(tmp) / "data.pt"
        torch.save(load_prose_chars(), data_path)
        for c in cfgs:
            c["data_path"] = str(data_path)
        ctx = multiprocessing.get_context("spawn")
        pool_args: dict[str, Any] = {"max_workers": jobs, "mp_context": ctx}
        if sys.version_info >= (3, 11):  # a fresh process per run (its own memory and threads); 3.10 reuses them
            pool_args["max_tasks_per_child"] = 1
        with concurrent.futures.ProcessPoolExecutor(**pool_args) as pool, \
                tqdm(total=len(cfgs), desc=desc, unit="run", dynamic_ncols=True) as bar:
            futures = [pool.submit(_child, c) for c in cfgs]
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()
                runs.append(r)
                with (out / "runs.jsonl").open("a") as f:  # kept as they finish: an interrupted grid keeps them
                    f.write(json.dumps(r, default=str) + "\n")
                bar.update(1)
                bar.write(f"{config_key(r)} seed={r['seed']}: "
                          + (f"error {r['error']}" if "error" in r else
                             f"{r['final_heldout']:.4f} ({r['ms_per_step']:.1f} ms/step)"))
    return runs


def run(args: argparse.Namespace, argv_text: str = "") -> int:
    task = LM_TASKS[args.task]
    cfgs, settings = _configs(args, task)
    out = args.out or Path("runs") / f"train-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for path in args.from_runs or []:  # runs recorded by earlier invocations (their runs.jsonl), reported with these
        runs += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    runs += _run_all(cfgs, settings["jobs"], out, args.task)
    record = {"command": argv_text, "settings": settings,
              "machine": machine_info(args.device, settings["threads"]), "runs": runs}
    record["summary"] = summarise(runs)
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    write_markdown(out / "results.md", record)
    write_plots(out, record)
    print((out / "results.md").read_text())
    return 1 if any("error" in r for r in runs) else 0
