"""Cost model that picks the cheapest exact-enough solve for a layer.

Costs are counted in multiply-adds of a large square matrix product. Constants measured once per
device and dtype (:func:`calibrate`) turn the other work into that unit: ``c_eig · n³`` for a
symmetric eigendecomposition of an ``n × n`` matrix, ``c_solve · n³`` for a linear solve,
``c_qr · d r²`` for a Householder QR of a ``d × r`` matrix (:func:`cgfac.curvature.factor_eig`),
``thin`` for the efficiency of CG's matrix-free products (thin, rectangular), and fixed
overheads per CG iteration and per direct solve (kernel launches, Python, synchronisation).

Each solver's cost formula lives with it (:mod:`cgfac.solvers`); :func:`kron_costs` and
:func:`exact_costs` tabulate the registered candidates of ``solver="auto"``
(:attr:`cgfac.solvers.Solver.auto_candidate`) in registration order, and :func:`choose` picks
the cheapest.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import torch

from cgfac.solvers.base import CostConstants

if TYPE_CHECKING:
    from cgfac.curvature.base import Curvature

__all__ = ["CostConstants", "calibrate", "candidates", "choose", "exact_costs", "kron_costs", "predicted_costs"]


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
    from cgfac.curvature.kron import KronRows
    from cgfac.solvers.cg import CGSolver
    from cgfac.solvers.lowrank import LowRankSolver

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
    plain_cg = CGSolver(iters, 1e-300, jacobi=False)
    t_iter = _best_time(lambda: plain_cg.run(tiny, b, 1.0), device) / iters
    t_call = _best_time(lambda: LowRankSolver().direct(tiny, b, 1.0), device)
    return CostConstants(c_eig=max(t_eig / t_mac, 1.0), c_solve=max(t_solve / t_mac, 0.3), c_qr=max(t_qr / t_mac, 1.0),
                         thin=max(t_thin / t_mac, 1.0), o_iter=t_iter / t_mac, o_call=t_call / t_mac)


def kron_costs(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c: CostConstants) -> dict[str, float]:
    """Predicted multiply-adds of every candidate on ``G X A + λX = ∇W`` (``r_a``, ``r_g`` rows; ``k`` CG products)."""
    from cgfac.solvers.registry import candidates

    costs = {s.name: s.kron_cost(r_a, r_g, d_in, d_out, k, c) for s in candidates("kron")}
    return {name: value for name, value in costs.items() if value is not None}


def exact_costs(rows: int, n: int, d_in: int, d_out: int, k: int, c: CostConstants) -> dict[str, float]:
    """Predicted multiply-adds of every candidate on the exact block (``rows`` rows, ``n`` samples)."""
    from cgfac.solvers.registry import candidates

    costs = {s.name: s.exact_cost(rows, n, d_in, d_out, k, c) for s in candidates("exact")}
    return {name: value for name, value in costs.items() if value is not None}


def predicted_costs(op: Curvature, k: int, c: CostConstants) -> dict[str, float]:
    """:func:`kron_costs` or :func:`exact_costs` of a curvature, by its ``kind``."""
    d_out, d_in = op.shape
    if op.kind == "kron":
        r_a, r_g = op.row_counts
        return kron_costs(r_a, r_g, d_in, d_out, k, c)
    if op.kind == "exact":
        return exact_costs(op.num_rows, op.num_samples, d_in, d_out, k, c)
    raise ValueError(f"no cost model for curvature kind {op.kind!r}")


def candidates(kind: str) -> tuple[str, ...]:
    """The names ``solver="auto"`` chooses from for a curvature kind."""
    from cgfac.solvers.registry import candidates as registered

    return tuple(s.name for s in registered(kind))


def choose(costs: dict[str, float]) -> str:
    """The candidate with the smallest predicted cost; on a tie (within rounding of sums taken in
    another order) the first listed."""
    lowest = min(costs.values())
    return next(name for name, value in costs.items() if value <= lowest * (1 + 1e-9))
