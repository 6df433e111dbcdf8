"""Every string option of the public constructors, as ``Literal`` types checked in one place.

A constructor annotates its argument with the type below and checks it with :func:`check`,
which raises ``TypeError`` for a non-string and ``ValueError`` (listing the choices) for an
unknown value. The solver name is the exception: solvers are a registry
(:func:`cgfac.solvers.register_solver`), so ``solver=`` is checked against it at construction.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from cgfac.config import choice

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
"""``"rmsprop"``: each layer's direction rescaled to the length of RMSProp's step (:mod:`cgfac.graft`)."""
DampingScale = Literal["absolute", "relative", "rank"]
"""``"absolute"``: every layer damped by λ; ``"relative"``: by ``λ·tr(C_l)/dim`` (its mean diagonal);
``"rank"``: by ``λ·tr(C_l)/rank`` (the mean of its non-zero spectrum, for few rows on wide layers)."""
Adaptive = Literal["lr+momentum", "lr", "none"]
"""What :class:`cgfac.optim.SecondOrderOptimizer`'s quadratic model chooses: ``(α, μ)``, ``α`` alone, nothing."""
FactorForm = Literal["dense", "diag-out", "diag-in", "diag"]
"""K-FAC's forms of a Kronecker block, densest first (:mod:`cgfac.memory`)."""
Direction = Literal["ortho", "spectral", "power", "ekfac", "ekfac-ortho"]
""":class:`cgfac.optim.TransformerKFAC`'s directions."""
Sides = Literal["input", "both", "smaller"]
"""Which Kronecker sides :class:`cgfac.optim.TransformerKFAC` preconditions (``"smaller"``: per layer,
the factor of the smaller dimension, the input side on a tie)."""
FactorSource = Literal["ema", "rows"]
"""Where :class:`cgfac.optim.TransformerKFAC`'s factors come from: running averages or this step's rows."""
ShardedGrads = Literal["auto", "owner", "all-gather"]
"""How FSDP2's sharded gradients reach a layer's solve (:mod:`cgfac.sharded`): ``"auto"`` the owner
scheme where it applies, else an all-gather; ``"owner"`` the owner scheme or ``ValueError``;
``"all-gather"`` every rank all-gathers every layer's gradient."""

def values(option_type: Any) -> tuple[str, ...]:
    """The allowed strings of a ``Literal`` type."""
    return tuple(get_args(option_type))


def check(name: str, value: object, option_type: Any) -> Any:
    """``value`` if it is one of ``option_type``'s strings; else ``TypeError``/``ValueError``."""
    return choice(name, value, values(option_type))
