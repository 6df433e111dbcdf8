"""The quadratic model of the loss on a step's batch (see :mod:`cgfac.optim`):
``M(δ) = ∇hᵀδ + ½ δᵀ (C + λI) δ`` with ``C`` the exact GGN, its Gram ``[vᵢᵀ C vⱼ]`` by forward-mode
passes through the recorded forwards, and the coefficients ``(α, μ)`` that minimise it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.profiler import record_function

from cgfac.losses import likelihood
from cgfac.optim.replay import Forward, ForwardRecorder, replayed_rng

try:  # torch >= 2.3: fused attention kernels have no forward-mode AD; the math kernel does
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward_ad_attention() -> Any:
        return sdpa_kernel(SDPBackend.MATH)
except ImportError:  # pragma: no cover - torch 2.2
    def forward_ad_attention() -> Any:
        return contextlib.nullcontext()

__all__ = ["ModelSchedule", "QuadraticModel", "fit_coefficients", "last", "output_quad_form", "solve_coefficients"]


def last(t: Tensor, k: int) -> Tensor:
    """The last ``k`` batch entries of ``t`` (all of them where the batch is smaller)."""
    return t[-k:] if k < t.shape[0] else t


def output_quad_form(outputs: Tensor, u: Tensor, w: Tensor, loss_type: str) -> Tensor:
    """``(1/r) Σ_rows uᵀ H w`` with ``H`` the Hessian of the likelihood ``loss_type`` at ``outputs``.

    Rows are every leading position of ``outputs`` (last dimension: classes or features); the
    sum is in float64.
    """
    model = likelihood(loss_type)
    z = outputs.reshape(-1, outputs.shape[-1]).double()
    u = u.reshape(z.shape).double()
    w = w.reshape(z.shape).double()
    return model.hessian_form(z, u, w) / z.shape[0]


class QuadraticModel:
    """The curvature side of the model: ``J v`` at a recorded forward and the Gram ``[vᵢᵀ C vⱼ]``
    over a step's forwards (only the last ``quad_samples`` entries of each, where set)."""

    def __init__(self, model: nn.Module, recorder: ForwardRecorder, loss_type: str | None,
                 quad_samples: int | None, output_fn: Callable[[Any], Tensor] | None) -> None:
        self.model, self.recorder, self.loss_type = model, recorder, loss_type
        self.quad_samples, self.output_fn = quad_samples, output_fn

    def tangent_outputs(self, fwd: Forward, tangents: dict[str, Tensor]) -> Tensor:
        """``J v`` at a recorded forward: the model run once in forward mode, buffers untouched."""
        named = dict(self.model.named_parameters())
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        args, kwargs = fwd.args, fwd.kwargs
        if self.quad_samples is not None:
            args = tuple(last(a, self.quad_samples) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)
        with self.recorder.paused(), replayed_rng(fwd.rng), torch.no_grad(), fwAD.dual_level(), \
                forward_ad_attention():
            params = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in named.items()}
            out = torch.func.functional_call(self.model, {**params, **buffers}, args, kwargs)
            if self.output_fn is not None:
                out = self.output_fn(out)
            tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:
            tangent = torch.zeros_like(out)
        return tangent

    def gram(self, forwards: list[Forward], vectors: list[dict[str, Tensor]]) -> Tensor:
        """``[vᵢᵀ C vⱼ]`` (float64): the exact GGN over every forward recorded this step, each
        weighted by its share of the rows."""
        assert self.loss_type is not None
        k = len(vectors)
        gram = torch.zeros(k, k, dtype=torch.float64)
        parts = []
        for fwd in forwards:
            outputs = fwd.outputs if self.quad_samples is None else last(fwd.outputs, self.quad_samples)
            parts.append((fwd, outputs, outputs.reshape(-1, outputs.shape[-1]).shape[0]))
        total = sum(rows for _, _, rows in parts)
        for fwd, outputs, rows in parts:
            jv = [self.tangent_outputs(fwd, v) for v in vectors]
            for i in range(k):
                for j in range(i, k):
                    q = output_quad_form(outputs, jv[i], jv[j], self.loss_type).cpu() * (rows / total)
                    gram[i, j] += q
                    if i != j:
                        gram[j, i] += q
        return gram

    @staticmethod
    def inner_products(vectors: list[dict[Tensor, Tensor]], grads: dict[Tensor, Tensor], params: list[Tensor],
                       lam: dict[Tensor, float], damping: float) -> tuple[Tensor, Tensor, Tensor]:
        """``[vᵢ·vⱼ]``, ``[Σ_p λ_p vᵢ,ₚ·vⱼ,ₚ]`` and ``[∇h·vᵢ]`` in float64, one small product per parameter."""
        k = len(vectors)
        pairs, grad_dots = [], []
        for p in params:  # dot products in the parameters' dtype (float32: BLAS sums blockwise), no copies
            flat = [vec[p].reshape(-1) for vec in vectors]
            upper = {(i, j): torch.dot(flat[i], flat[j]) for i in range(k) for j in range(i, k)}
            pairs.append(torch.stack([upper[min(i, j), max(i, j)] for i in range(k) for j in range(k)]))
            grad_dots.append(torch.stack([torch.dot(f, grads[p].reshape(-1)) for f in flat]))
        pair = torch.stack([t.double() for t in pairs]).cpu().reshape(len(params), k, k)  # one read
        lin = torch.stack([t.double() for t in grad_dots]).cpu().sum(0)
        weights = torch.tensor([lam.get(p, damping) for p in params], dtype=torch.float64)
        return pair.sum(0), (weights[:, None, None] * pair).sum(0), lin


def solve_coefficients(damped: Tensor, lin: Tensor, adaptive: str, has_prev: bool,
                       momentum: float) -> tuple[float, float] | None:
    """Minimise ``½ cᵀ damped c + linᵀ c`` over the adapted coefficients: ``(α, μ)`` jointly
    (``adaptive="lr+momentum"`` with a previous update and a well-conditioned 2 × 2 system), else
    ``α`` with ``μ`` fixed at ``momentum`` (0 without a previous update); None: no finite minimum."""
    if not (torch.isfinite(damped).all() and torch.isfinite(lin).all()):
        return None
    if adaptive == "lr+momentum" and has_prev:
        det = damped[0, 0] * damped[1, 1] - damped[0, 1] ** 2
        if det > 1e-12 * damped[0, 0] * damped[1, 1]:
            sol = -torch.linalg.solve(damped, lin)
            return float(sol[0]), float(sol[1])
    if damped[0, 0] <= 0:
        return None
    mu = momentum if has_prev else 0.0
    # With μ fixed: α = −(lin₀ + μ M₀₁) / M₀₀.
    cross = float(damped[0, 1]) * mu if has_prev else 0.0
    return float(-(lin[0] + cross) / damped[0, 0]), mu


def fit_coefficients(gram_fn: Callable[[list[dict[str, Tensor]]], Tensor], vectors: list[dict[Tensor, Any]],
                     names: dict[Tensor, str], grads: dict[Tensor, Tensor], lam: dict[Tensor, float], damping: float,
                     weight_decay: float, adaptive: str, momentum: float, lr: float,
                     info: dict[str, float]) -> tuple[tuple[float, float], float] | None:
    """``(α, μ)`` minimising the model over ``vectors`` (``[Δ]`` or ``[Δ, δ₀]``) and the model's change
    ``M(δ) − M(0)`` (without ``λ``) of the update ``lr·α·Δ + μ·δ₀``; None where no finite minimum.

    ``gram_fn``: ``[vᵢᵀ C vⱼ]`` of vectors keyed by parameter name (:meth:`QuadraticModel.gram`);
    ``lam``: each parameter's damping in this step's solve (``damping`` for the others); ``info``
    receives ``dir_curvature``, ``dir_grad``, ``alpha``, ``mu``, ``quad_change``."""
    params = list(grads)
    has_prev = len(vectors) > 1
    with record_function("cgfac.optim.quad_model"):
        gram = gram_fn([{names[p]: v[p] for p in params} for v in vectors])  # vᵢᵀ C vⱼ
    dots, damped_dots, lin = QuadraticModel.inner_products(vectors, grads, params, lam, damping)
    info.update(dir_curvature=float(gram[0, 0]), dir_grad=float(lin[0]))
    c = solve_coefficients(gram + damped_dots, lin, adaptive, has_prev, momentum)
    if c is None:
        return None
    alpha, mu = c
    # Model change of the update actually applied (group lr scales α), without damping.
    v = torch.tensor([alpha * lr, mu] if has_prev else [alpha * lr], dtype=torch.float64)
    quad_change = float(lin @ v + 0.5 * v @ (gram + weight_decay * dots) @ v)
    info.update(alpha=alpha, mu=mu if has_prev else 0.0, quad_change=quad_change)
    return c, quad_change


@dataclass
class ModelSchedule:
    """When the quadratic model is evaluated, and the coefficients reused in between (``quad_every``).

    With ``every = 1`` (the default) the model is evaluated on every step. Otherwise it is evaluated:

    * on the first step, and on the step after an update was undone, a step was skipped or ``λ``
      moved by more than a factor ``1 + tolerance`` (:meth:`reset`);
    * on every step whose Levenberg–Marquardt check is due (``ρ`` needs the model's predicted change);
    * once ``period`` steps have passed since the last evaluation.

    After an evaluation, ``period`` doubles (at most ``every``) when ``α`` and ``μ`` each moved by at
    most ``tolerance`` relative to the previous evaluation's (``|x − x₀| ≤ tol · max(|x|, |x₀|)``),
    and returns to 1 otherwise. Between evaluations the last ``(α, μ)`` are reused: the step is
    ``δ = lr · α · Δ + μ · δ₀`` with this step's direction ``Δ``.
    """

    every: int = 1
    tolerance: float = 0.1
    period: int = 1
    last_step: int = -1
    coeffs: tuple[float, float] | None = None

    def due(self, step: int, check_due: bool) -> bool:
        """Whether the model must be evaluated on the step numbered ``step`` (from 0)."""
        return self.every == 1 or self.coeffs is None or check_due or step - self.last_step >= self.period

    def record(self, step: int, coeffs: tuple[float, float]) -> None:
        """An evaluation's coefficients: the period doubles where they moved little, else is reset."""
        if self.coeffs is not None and all(abs(x - x0) <= self.tolerance * max(abs(x), abs(x0))
                                           for x, x0 in zip(coeffs, self.coeffs)):
            self.period = min(2 * self.period, self.every)
        else:
            self.period = 1
        self.coeffs, self.last_step = coeffs, step

    def reset(self) -> None:
        """Evaluate on the next step, the period back at 1."""
        self.coeffs, self.period = None, 1

    def state(self) -> dict[str, Any]:
        return {"period": self.period, "last_step": self.last_step, "coeffs": self.coeffs}

    def load(self, state: dict[str, Any]) -> None:
        self.period, self.last_step = int(state["period"]), int(state["last_step"])
        coeffs = state["coeffs"]
        self.coeffs = None if coeffs is None else (float(coeffs[0]), float(coeffs[1]))
