"""The optimizers of ``cgfac-bench train`` by name, their learning-rate grids, and the settings of the
preconditioned runs (:class:`SecondOrder`), with the command-line parsers of both."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

ADAPTIVE = ("kfac-adaptive", "cgfac-kron-adaptive", "cgfac-exact-adaptive")  # cgfac.optim: own the update
PRECONDITIONED = ("cgfac-kron", "cgfac-exact", "kfac")  # a preconditioner under SGD with momentum
PEERS = ("adam", "adamw", "sgd", "soap", "shampoo", "muon", "muon-original")
ALL_OPTIMIZERS = ADAPTIVE + PRECONDITIONED + PEERS
OPTIMIZERS = ("cgfac-kron", "cgfac-exact", "kfac", "adam", "sgd")  # the default list without --tuned
LR_GRID: dict[str, tuple[float, ...]] = {
    "cgfac-kron": (0.1, 0.3),
    "cgfac-exact": (0.1, 0.3),
    "kfac": (0.1, 0.3),
    "kfac-adaptive": (1.0,),  # a multiplier of the quadratic model's step
    "cgfac-kron-adaptive": (1.0,),
    "cgfac-exact-adaptive": (1.0,),
    "adam": (1e-3, 3e-3),
    "adamw": (1e-3, 3e-3),
    "sgd": (0.03, 0.1),
    "soap": (1e-3, 3e-3),
    "shampoo": (0.03, 0.1),
    "muon": (1e-3, 3e-3),  # adjust_lr_fn="match_rms_adamw": AdamW-like learning rates
    "muon-original": (0.01, 0.02),  # adjust_lr_fn="original" (Keller Jordan's scaling; 0.02 his default)
}

SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class SecondOrder:
    """Settings of the preconditioned runs (CG-FAC and K-FAC)."""

    damping: float
    kl_clip: float | None
    momentum: float = 0.9
    curvature_window: int = 1  # CG-FAC: batches whose rows form the curvature
    curvature_samples: int | None = None  # CG-FAC: samples of each batch used for curvature (None: all)
    factor_decay: float = 0.95  # K-FAC's running factors
    inv_update_steps: int = 10  # K-FAC's eigendecomposition interval
    factor_update_steps: int = 1  # K-FAC's factor refresh interval (rows are captured on those steps only)
    fisher: str = "empirical"  # "true": targets sampled from the model (one extra backward)
    adaptive: str = "lr+momentum"  # the *-adaptive optimizers: what the quadratic model chooses
    quad_samples: int | None = None  # the *-adaptive optimizers: samples for the GGN products (None: all)
    quad_every: int = 1  # the *-adaptive optimizers: longest period of the quadratic model (coefficients reused)
    quad_tol: float = 0.1  # the *-adaptive optimizers: relative change of (α, μ) and λ the reuse tolerates
    kfac_samples: int | None = None  # K-FAC: samples of each batch for the factors (None: all)
    min_damping: float = 1e-3  # the *-adaptive optimizers: lower bound of the LM-adapted λ (the library default)
    damping_form: str = "exact"  # "exact" or "factored" (K-FAC and CG-FAC kron)
    damping_scale: str = "absolute"  # "absolute" or "relative" (λ times each layer's mean curvature)
    graft: str = "none"  # "rmsprop": each layer's direction at RMSProp's step length (kfac, cgfac-*)


def parse_grid(text: str | None, optimizers: Sequence[str], defaults: Mapping[str, Sequence[float]],
               flag: str = "--lr-grid") -> dict[str, list[float]]:
    """``defaults`` for ``optimizers``, overridden by ``"0.1,0.3"`` (all) or ``"adam=1e-3;kfac=0.1,0.3"``."""
    grid = {name: list(defaults[name]) for name in optimizers}
    if not text:
        return grid
    for part in filter(None, (p.strip() for p in text.split(";"))):
        names, _, values = part.rpartition("=")
        targets = [names.strip()] if names else list(optimizers)
        try:
            lrs = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag}: not a list of numbers: {values!r}") from None
        if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
            raise ValueError(f"{flag}: values must be positive numbers, got {values!r}")
        for name in targets:
            if name not in grid:
                raise ValueError(f"{flag}: {name!r} is not among the optimizers {tuple(optimizers)}")
            grid[name] = lrs
    return grid


def parse_lr_grid(text: str | None, optimizers: Sequence[str]) -> dict[str, list[float]]:
    """:data:`LR_GRID`, overridden by ``"0.1,0.3"`` (all) or ``"adam=1e-3;kfac=0.1,0.3"``."""
    return parse_grid(text, optimizers, LR_GRID)


def parse_hyper(text: str | None) -> dict[str, Any]:
    """``"field=value,..."`` → overrides of :class:`SecondOrder`, each value parsed as its field's type."""
    if not text:
        return {}
    defaults = SecondOrder(damping=1.0, kl_clip=None)
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in {f.name for f in fields(SecondOrder)}:
            raise ValueError(f"--hyper: {item!r} is not field=value with a field of "
                             f"{', '.join(f.name for f in fields(SecondOrder))}")
        current = getattr(defaults, key)
        if value.lower() == "none":
            out[key] = None
        elif isinstance(current, str):
            out[key] = value
        elif isinstance(current, int) and not isinstance(current, bool) and key not in ("damping",):
            out[key] = int(value)
        else:
            out[key] = float(value) if key not in ("curvature_samples", "quad_samples", "kfac_samples") else int(value)
    return out
