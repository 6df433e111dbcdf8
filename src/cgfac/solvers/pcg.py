"""Preconditioned conjugate gradients on matrices (Saad 2003, Alg. 9.1).

Solves ``𝒜(X) = B`` for a symmetric positive definite linear map ``𝒜`` given only as a
function, with the Frobenius inner product ``⟨X, Y⟩ = Σ X ⊙ Y`` and an optional elementwise
(Jacobi) preconditioner ``M`` (``z = r ⊘ M``). Stops when ``‖B − 𝒜X‖ ≤ tol·‖B‖`` (the
recursively updated residual), after ``max_iters`` products, or on breakdown: a zero residual,
``⟨p, 𝒜p⟩ ≤ 0``, ``⟨r, z⟩ ≤ 0`` or any non-finite value. It never divides by zero, and it
returns the last finite iterate: CG's iterates minimise the ``𝒜``-norm of the error over growing
Krylov spaces, so the latest one is the best (the residual norm itself need not decrease).

A warm start ``X₀`` is scaled optimally first, ``X₀ ← α X₀`` with ``α = ⟨X₀, B⟩ / ⟨X₀, 𝒜X₀⟩``
(the ``𝒜``-norm-optimal point on the line through ``X₀``), so it is never worse than a cold
start in that norm; it costs the one product the initial residual needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "cg"]


@dataclass
class CGResult:
    """The returned iterate and how it was reached."""

    x: Tensor
    iters: int  # CG iterations (one product each)
    products: int  # products in all: iterations plus one for a warm start's residual
    rel_residual: float  # ‖B − 𝒜X‖ / ‖B‖ of the returned iterate (recursively updated)
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
        return CGResult(torch.zeros_like(b), 0, 0, float("nan"), False, "non-finite right-hand side")
    if b_norm == 0:
        return CGResult(torch.zeros_like(b), 0, 0, 0.0, True, None)
    x, r, res, products = torch.zeros_like(b), b.clone(), 1.0, 0
    if x0 is not None:
        ax = apply(x0)
        products = 1
        xax = _dot(x0, ax)
        scale = _dot(x0, b) / xax if torch.isfinite(xax) and xax > 0 else None
        if scale is not None and torch.isfinite(scale) and scale != 0:
            x = x0 * scale
            r = b - ax * scale
            res = float(torch.linalg.vector_norm(r) / b_norm)
        if res != res or res == float("inf"):  # a non-finite warm start: start cold
            x, r, res = torch.zeros_like(b), b.clone(), 1.0
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
        r_new = r - alpha * ap
        res_new = float(torch.linalg.vector_norm(r_new) / b_norm)
        if res_new != res_new or res_new == float("inf"):
            breakdown = "non-finite residual"
            break
        x.add_(p, alpha=alpha)  # type: ignore[arg-type]  # a 0-d tensor alpha (no host sync)
        r, res = r_new, res_new
        if res == 0:
            break
        z = r / diag if diag is not None else r
        rz_new = _dot(r, z)
        if not (torch.isfinite(rz_new) and rz_new > 0):
            breakdown = "r'z <= 0 or non-finite"
            break
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return CGResult(x, iters, products + iters, res, res <= tol, breakdown)
