"""Cost model that picks the cheapest exact-enough solve for a layer.

Costs are counted in multiply-adds of a large square matrix product. Constants measured once per
device and dtype (:func:`calibrate`) turn the other work into that unit: ``c_eig · n³`` for a
symmetric eigendecomposition of an ``n × n`` matrix, ``c_solve · n³`` for a linear solve,
``c_qr · d r²`` for a Householder QR of a ``d × r`` matrix, ``thin`` for the efficiency of CG's
matrix-free products (thin, rectangular), and fixed
overheads per CG iteration and per direct solve (kernel launches, Python, synchronisation).

Candidates for the Kronecker system (rows ``r_a``, ``r_g``; widths ``d_in``, ``d_out``;
``p = d_in·d_out``; ``k`` CG products; ``q_a = min(r_a, d_in)``, ``q_g = min(r_g, d_out)``)::

    cg       k · (thin · min((r_g + r_a) p + r_g r_a (d_in + d_out), 2 (r_g + r_a) p) + 4p + o_iter)
    eigen    r_a d_in² + r_g d_out² + c_eig (d_in³ + d_out³) + 2p (d_in + d_out) + o_call
    lowrank  Σ_sides [(c_qr + 1) r² d + (c_eig + 1) r³  if r < d  else  r d² + c_eig d³]
             + (q_g + q_a) p + q_g q_a (d_in + d_out) + o_call

and for the exact block (``r`` rows, ``n`` samples)::

    cg       k · (thin · 2 r p + 4p + o_iter)        (jvp ``(gV)⊙a``: r p, vjp ``gᵀ diag(c) a``: r p)
    lowrank  min(r² (d_in + d_out), r p + n² p) + 2 r p + c_solve n³ + o_call
"""

from __future__ import annotations

import functools
import time
from dataclasses import astuple, dataclass

import torch

KRON_METHODS = ("cg", "lowrank", "eigen")
EXACT_METHODS = ("cg", "lowrank")


@dataclass(frozen=True)
class CostConstants:
    """Measured conversion factors into square-matmul multiply-adds (see the module docstring)."""

    c_eig: float
    c_solve: float
    c_qr: float
    thin: float
    o_iter: float
    o_call: float

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


def _best_time(fn, device: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


@functools.cache
def calibrate(device: str, dtype: torch.dtype, n: int = 384) -> CostConstants:
    """Time a square product, an eigendecomposition, a solve, a thin product and tiny solves."""
    from cgfac.cg import cg
    from cgfac.kron import KronRows

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    x = rand(n, n)
    spd = x @ x.T + n * torch.eye(n, dtype=dtype, device=device)
    t_mac = _best_time(lambda: x @ x, device) / n**3
    t_eig = _best_time(lambda: torch.linalg.eigh(spd), device) / n**3
    t_solve = _best_time(lambda: torch.linalg.solve(spd, x), device) / n**3
    tall = rand(3 * n, n // 3)
    t_qr = _best_time(lambda: torch.linalg.qr(tall), device) / (3 * n * (n // 3) ** 2)
    thin_op, v = KronRows(rand(n // 3, n), rand(n // 3, n)), rand(n, n)
    thin_macs = min(2 * (n // 3) * n * n + (n // 3) ** 2 * 2 * n, 4 * (n // 3) * n * n)
    t_thin = _best_time(lambda: thin_op.matvec(v, 1.0), device) / thin_macs
    tiny, b = KronRows(rand(8, 8), rand(8, 8)), rand(8, 8)
    iters = 10
    t_iter = _best_time(lambda: cg(lambda w: tiny.matvec(w, 1.0), b, max_iters=iters, tol=1e-300), device) / iters
    t_call = _best_time(lambda: tiny.solve_lowrank(b, 1.0), device)
    return CostConstants(c_eig=max(t_eig / t_mac, 1.0), c_solve=max(t_solve / t_mac, 0.3), c_qr=max(t_qr / t_mac, 1.0),
                         thin=max(t_thin / t_mac, 1.0), o_iter=t_iter / t_mac, o_call=t_call / t_mac)


def _side(rows: int, width: int, c: CostConstants) -> float:
    """Eigenpairs of one factor: QR of the rows and an ``r × r`` eigh, or the ``d × d`` factor."""
    if rows < width:
        return (c.c_qr + 1) * rows**2 * width + (c.c_eig + 1) * rows**3
    return rows * width**2 + c.c_eig * width**3


def kron_costs(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> dict[str, float]:
    p = d_in * d_out
    product = min((r_g + r_a) * p + r_g * r_a * (d_in + d_out), 2 * (r_g + r_a) * p)
    q_a, q_g = min(r_a, d_in), min(r_g, d_out)
    return {  # eigen before lowrank: with r ≥ d on both sides lowrank is eigen plus arithmetic (a tie)
        "cg": k * (c.thin * product + 4 * p + c.o_iter),
        "eigen": r_a * d_in**2 + r_g * d_out**2 + c.c_eig * (d_in**3 + d_out**3)
        + 2 * p * (d_in + d_out) + c.o_call,
        "lowrank": _side(r_a, d_in, c) + _side(r_g, d_out, c)
        + (q_g + q_a) * p + q_g * q_a * (d_in + d_out) + c.o_call,
    }


def exact_costs(rows: int, n: int, d_in: int, d_out: int, k: int, c: CostConstants) -> dict[str, float]:
    p = d_in * d_out
    return {
        "cg": k * (c.thin * 2 * rows * p + 4 * p + c.o_iter),
        "lowrank": min(rows**2 * (d_in + d_out), rows * p + n * n * p) + 2 * rows * p
        + c.c_solve * n**3 + c.o_call,
    }


def choose(costs: dict[str, float]) -> str:
    """The candidate with the smallest predicted cost; on a tie (within rounding of sums taken in
    another order) the first listed."""
    lowest = min(costs.values())
    return next(name for name, value in costs.items() if value <= lowest * (1 + 1e-9))
