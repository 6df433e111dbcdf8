"""Preconditioned conjugate gradients on matrices (Saad 2003, Alg. 9.1).

Solves ``𝒜(X) = B`` for a symmetric positive definite linear map ``𝒜`` given only as a
function, with the Frobenius inner product ``⟨X, Y⟩ = Σ X ⊙ Y`` and an optional elementwise
(Jacobi) preconditioner ``M`` (``z = r ⊘ M``). Stops when ``‖B − 𝒜X‖ ≤ tol·‖B‖`` (the
recursively updated residual), after ``max_iters`` products, or on breakdown: a zero residual,
``⟨p, 𝒜p⟩ ≤ 0``, ``⟨r, z⟩ ≤ 0`` or any non-finite value. It never divides by zero and returns
the iterate with the smallest residual seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CGResult:
    """The returned iterate and how it was reached."""

    x: Tensor
    iters: int  # matrix products spent on iterations (the initial residual not counted)
    rel_residual: float  # ‖B − 𝒜X‖ / ‖B‖ of the returned iterate (recursive estimate)
    converged: bool
    breakdown: str | None  # why it stopped early, if it did


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return torch.vdot(x.reshape(-1), y.reshape(-1))


def cg(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    max_iters: int,
    tol: float,
    diag: Tensor | None = None,
) -> CGResult:
    """Run preconditioned CG from ``x0`` (zeros if None); ``diag`` is the Jacobi preconditioner."""
    b_norm = torch.linalg.vector_norm(b)
    if not torch.isfinite(b_norm):
        return CGResult(torch.zeros_like(b), 0, float("nan"), False, "non-finite right-hand side")
    if b_norm == 0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True, None)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    res = float(torch.linalg.vector_norm(r) / b_norm)
    if x0 is not None and not res < 1.0:  # a poor or non-finite warm start: start cold
        x, r, res = torch.zeros_like(b), b.clone(), 1.0
    best_x, best_res = x.clone(), res
    z = r / diag if diag is not None else r
    p = z.clone()
    rz = _dot(r, z)
    breakdown = None
    iters = 0
    while res > tol and iters < max_iters:
        ap = apply(p)
        iters += 1
        pap = _dot(p, ap)
        if not (torch.isfinite(pap) and pap > 0):
            breakdown = "p'Ap <= 0 or non-finite"
            break
        alpha = rz / pap
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        res = float(torch.linalg.vector_norm(r) / b_norm)
        if not res == res or res == float("inf"):
            breakdown = "non-finite residual"
            break
        if res < best_res:
            best_x.copy_(x)
            best_res = res
        if res == 0:
            break
        z = r / diag if diag is not None else r
        rz_new = _dot(r, z)
        if not (torch.isfinite(rz_new) and rz_new > 0):
            breakdown = "r'z <= 0 or non-finite"
            break
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return CGResult(best_x, iters, best_res, best_res <= tol, breakdown)
