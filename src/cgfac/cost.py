"""Cost model that picks the cheapest exact-enough solve for a layer.

Costs are counted in matrix-multiply multiply-adds. A symmetric eigendecomposition of an
``n × n`` matrix costs ``c_eig · n³`` and a linear solve ``c_solve · n³``; both constants are
measured once per device and dtype against a matrix product (on a CPU ``c_eig`` is typically
5–30, on a GPU far more), so the choice follows the hardware it runs on.

Candidates for the Kronecker system (rows ``r_a``, ``r_g``; widths ``d_in``, ``d_out``; ``k`` CG
iterations; ``p = d_in·d_out``)::

    cg       k · (min((r_g + r_a) p + r_g r_a (d_in + d_out), 2 (r_g + r_a) p) + 4p)
    lowrank  (r_g + r_a) p + r_g r_a (d_in + d_out) + 2 (r_a² d_in + r_g² d_out) + c_eig (r_a³ + r_g³)
    eigen    r_a d_in² + r_g d_out² + c_eig (d_in³ + d_out³) + 2p (d_in + d_out)

and for the exact block (``r`` rows, ``n`` samples)::

    cg       k · (4 r p + 4p)
    lowrank  r² (d_in + d_out) + 4 r p + c_solve n³
"""

from __future__ import annotations

import functools
import time

import torch

KRON_METHODS = ("cg", "lowrank", "eigen")
EXACT_METHODS = ("cg", "lowrank")


@functools.cache
def calibrate(device: str, dtype: torch.dtype, n: int = 384) -> tuple[float, float]:
    """``(c_eig, c_solve)``: seconds of ``eigh`` / ``solve`` per ``n³``, over a product's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    spd = x @ x.T + n * torch.eye(n, dtype=dtype, device=device)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_mm = best(lambda: x @ x)
    t_eig = best(lambda: torch.linalg.eigh(spd))
    t_solve = best(lambda: torch.linalg.solve(spd, x))
    return max(t_eig / t_mm, 1.0), max(t_solve / t_mm, 0.3)


def kron_costs(r_a: int, r_g: int, d_in: int, d_out: int, k: int, c_eig: float) -> dict[str, float]:
    p = d_in * d_out
    product = min((r_g + r_a) * p + r_g * r_a * (d_in + d_out), 2 * (r_g + r_a) * p)
    return {
        "cg": k * (product + 4 * p),
        "lowrank": (r_g + r_a) * p + r_g * r_a * (d_in + d_out)
        + 2 * (r_a**2 * d_in + r_g**2 * d_out) + c_eig * (r_a**3 + r_g**3),
        "eigen": r_a * d_in**2 + r_g * d_out**2 + c_eig * (d_in**3 + d_out**3)
        + 2 * p * (d_in + d_out),
    }


def exact_costs(rows: int, n: int, d_in: int, d_out: int, k: int, c_solve: float) -> dict[str, float]:
    p = d_in * d_out
    return {
        "cg": k * (4 * rows * p + 4 * p),
        "lowrank": rows**2 * (d_in + d_out) + 4 * rows * p + c_solve * n**3,
    }


def choose(costs: dict[str, float]) -> str:
    """The candidate with the smallest predicted cost."""
    return min(costs, key=costs.__getitem__)
