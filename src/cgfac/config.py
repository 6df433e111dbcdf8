"""The library's configuration checks: hyperparameters and string options, validated in one place.

Hyperparameters (:class:`HyperParam`) are a number or a schedule ``step -> number``, checked on
every use; :func:`check_range`, :func:`positive_int` and :func:`choice` validate plain arguments.

Every string option of the public constructors is a ``Literal`` type below, checked with
:func:`check`, which raises ``TypeError`` for a non-string and ``ValueError`` (listing the choices)
for an unknown value. The solver name is the exception: solvers are a registry
(:func:`cgfac.solvers.register_solver`), so ``solver=`` is checked against it at construction.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, overload

Hyper = Union[float, Callable[[int], float]]


def check_range(name: str, value: object, *, low: float | None, low_open: bool, high: float | None) -> float:
    """``value`` as a finite float in ``(low, high]`` (``[low, high]`` unless ``low_open``; None: no
    bound), else ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a callable step -> number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


class HyperParam:
    """A named hyperparameter with bounds; a callable is evaluated (and checked) at each step."""

    def __init__(self, name: str, value: Hyper, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None) -> None:
        self.name, self.low, self.low_open, self.high = name, low, low_open, high
        self.value = value
        if not callable(value):
            check_range(name, value, low=low, low_open=low_open, high=high)

    def __call__(self, step: int) -> float:
        value = self.value(step) if callable(self.value) else self.value
        label = f"{self.name} (returned by the callable at step {step})" if callable(self.value) else self.name
        return check_range(label, value, low=self.low, low_open=self.low_open, high=self.high)


@overload
def positive_int(name: str, value: object, *, allow_none: Literal[False] = False) -> int: ...


@overload
def positive_int(name: str, value: object, *, allow_none: bool) -> int | None: ...


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """An integer argument ``>= 1`` (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    """A string argument from a fixed set."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {options}, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


CurvatureKind = Literal["kron", "exact"]
"""``"kron"``: ``G X A + λX = ∇W``; ``"exact"``: ``(F + λI) vec X = vec ∇W`` (empirical-Fisher block)."""
SolverName = Literal["auto", "cg", "lowrank", "eigen"]
"""The built-in solvers (``CGFAC(solver=...)`` also accepts any registered name)."""
DampingForm = Literal["exact", "factored"]
"""``"exact"``: ``G X A + λX``; ``"factored"``: ``(G + γ_G I) X (A + γ_A I)`` (Tikhonov split by π)."""
LossReduction = Literal["mean", "sum"]
FisherKind = Literal["empirical", "true"]
LossType = Literal["cross_entropy", "gaussian", "mse", "bernoulli"]
Strategy = Literal["comm-opt", "mem-opt"]
FactorWarmup = Literal["first", "mean"]
GraftKind = Literal["none", "rmsprop"]
"""``"rmsprop"``: each layer's direction rescaled to the length of RMSProp's step (:mod:`cgfac.precondition.graft`)."""
DampingScale = Literal["absolute", "relative", "rank"]
"""``"absolute"``: every layer damped by λ; ``"relative"``: by ``λ·tr(C_l)/dim`` (its mean diagonal);
``"rank"``: by ``λ·tr(C_l)/rank`` (the mean of its non-zero spectrum, for few rows on wide layers)."""
Adaptive = Literal["lr+momentum", "lr", "none"]
"""What :class:`cgfac.optim.SecondOrderOptimizer`'s quadratic model chooses: ``(α, μ)``, ``α`` alone, nothing."""
FactorForm = Literal["dense", "diag-out", "diag-in", "diag"]
"""K-FAC's forms of a Kronecker block, densest first (:mod:`cgfac.precondition.memory`)."""
Direction = Literal["ortho", "spectral", "power", "ekfac", "ekfac-ortho"]
""":class:`cgfac.optim.TransformerKFAC`'s directions."""
Sides = Literal["input", "both", "smaller"]
"""Which Kronecker sides :class:`cgfac.optim.TransformerKFAC` preconditions (``"smaller"``: per layer,
the factor of the smaller dimension, the input side on a tie)."""
FactorSource = Literal["ema", "rows"]
"""Where :class:`cgfac.optim.TransformerKFAC`'s factors come from: running averages or this step's rows."""
ShardedGrads = Literal["auto", "owner", "all-gather"]
"""How FSDP2's sharded gradients reach a layer's solve (:mod:`cgfac.distributed.sharded`): ``"auto"`` the owner
scheme where it applies, else an all-gather; ``"owner"`` the owner scheme or ``ValueError``;
``"all-gather"`` every rank all-gathers every layer's gradient."""

def values(option_type: Any) -> tuple[str, ...]:
    """The allowed strings of a ``Literal`` type."""
    return tuple(get_args(option_type))


def check(name: str, value: object, option_type: Any) -> Any:
    """``value`` if it is one of ``option_type``'s strings; else ``TypeError``/``ValueError``."""
    return choice(name, value, values(option_type))
