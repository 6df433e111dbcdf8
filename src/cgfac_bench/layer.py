"""One square layer's preconditioning time and memory against its width.

The layer is ``d_out × d_in`` with ``d_out = d_in = width`` (``--bias`` appends the ones column to
the rows, so ``d_in = width + 1``). Its curvature comes from ``rows`` samples (one row each, so
``A = aᵀa/m``, ``G = gᵀg/m``, ``∇W = gᵀa/m``) of a synthetic, realistic stream (:class:`RowStream`):
activations with a dominant mean and a power-law spectrum, zero-mean output gradients with a
steeper power law, correlated from batch to batch. Damping is relative: ``λ = --damping × mean
diag(A) × mean diag(G)`` of the first batch, then fixed. Everything is float32.

Methods (one call = one preconditioning step of the layer, starting from its rows and ``∇W``):

* ``cgfac-cg-cold``: ``KronRows`` + Jacobi-preconditioned CG from zero.
* ``cgfac-cg-warm``: the same, warm-started from the previous step's solution, along
  ``--warm-steps`` correlated batches (a cold, untimed step first); mean time and iterations.
* ``cgfac-lowrank``: ``KronRows.solve_lowrank``.
* ``cgfac-auto``: :class:`cgfac.solvers.AutoSolver` (the cost model, then the chosen solve), along
  the same sequence as ``cgfac-cg-warm`` with a layer's solver state (warm start, last iteration
  count, probes).
* ``kfac-fresh``: form ``A``, ``G``; eigendecompose both; solve (``KronEigen``).
* ``kfac-amortised``: running-average factor update + solve with the stored decomposition +
  1/``--inv-update-steps`` of a measured eigendecomposition.
* ``explicit-product``: form ``A``, ``G`` and compute one ``G V A`` (reference product).
* ``matfree-product``: one ``KronRows.matvec`` (the matrix-free ``G V A + λV``).

Time: wall clock (CUDA synchronised), median of up to ``--repeats`` calls after ``--warmup``
calls, stopping once ``--time-budget`` seconds of timed calls are spent (at least one). A warm-up
call longer than ``--max-seconds-per-method`` stands as the measurement (``timed_calls = 0``), and
that method is skipped at larger widths for the same rows (recorded).

Memory: (a) curvature held between steps, summed from the tensors kept (K-FAC amortised: ``A``,
``G``, ``Q_A``, ``Q_G``, ``s_A``, ``s_G``; CG-FAC and K-FAC fresh: the rows ``a``, ``g``; the warm
start ``X`` reported apart); (b) the peak of bytes torch allocates during the first warm-up call
above the level at its start (output included): CUDA ``max_memory_allocated``, CPU the torch
profiler's allocation events summed in time order (:func:`peak_extra_bytes`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from cgfac.curvature import KronFactors, KronRows, RunningFactors
from cgfac.layers import Rows
from cgfac.solvers import AutoSolver, CGSolver, EigenSolver, LowRankSolver, SolverState
from cgfac.solvers.cost import calibrate
from cgfac.solvers.pcg import CGResult
from cgfac_bench.machine import default_device, machine_info

METHODS = ("cgfac-cg-cold", "cgfac-cg-warm", "cgfac-lowrank", "cgfac-auto", "kfac-fresh",
           "kfac-amortised", "explicit-product", "matfree-product")
WIDTHS = (256, 512, 1024, 2048, 4096, 8192)
ROWS = (64, 128, 512)
QUICK_WIDTHS = (256, 512, 1024)
QUICK_ROWS = (128,)
TARGET_WIDTH, TARGET_ROWS = 4096, 128
MIB = 2**20

# Estimated peak floats per method, as a multiple of d_out·d_in (rows terms added separately):
# CG keeps x, r, p, z, Ap, the diagonal, the best iterate and ∇W; K-FAC the factors, their
# eigenvectors and the eigh workspace.
_FLOATS_PER_ENTRY = {"cgfac-cg-cold": 10, "cgfac-cg-warm": 11, "cgfac-auto": 12, "cgfac-lowrank": 6,
                     "kfac-fresh": 12, "kfac-amortised": 12, "explicit-product": 6, "matfree-product": 4}


# --- measuring ---------------------------------------------------------------------------------
@dataclass
class Timing:
    """One measured callable: median seconds, timed calls, peak extra bytes, last result."""

    seconds: float
    calls: int  # timed calls; 0 when the warm-up call alone exceeded ``max_s`` and stands instead
    peak_bytes: int | None  # of the first warm-up call (None when not probed)
    result: Any


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` once: its result and the peak of torch-allocated bytes above the start level.

    CUDA: ``max_memory_allocated`` after a reset, minus the allocation at the start. CPU: the
    allocation events (``[memory]``, signed sizes) of ``torch.profiler`` with
    ``profile_memory=True``, summed in time order; tensors freed during the call that existed
    before it lower the level, so the peak is never below 0.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(torch.cuda.max_memory_allocated(device) - base, 0)
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, budget_s: float,
            max_s: float, memory: bool = True) -> Timing:
    """Time ``fn`` (see the module docstring); the first warm-up call runs under the memory probe."""
    peak, out, slow = None, None, None
    for i in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        if i == 0 and memory:
            out, peak = peak_extra_bytes(fn, device)
        else:
            out = fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed > max_s:
            slow = elapsed
            break
    if slow is not None:
        return Timing(slow, 0, peak, out)
    if memory and warmup == 0:
        out, peak = peak_extra_bytes(fn, device)
    times: list[float] = []
    while len(times) < max(repeats, 1) and (not times or sum(times) < budget_s):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), len(times), peak, out)


def check_memory_probe(device: torch.device, n: int = 256) -> dict[str, float]:
    """Sanity check of :func:`peak_extra_bytes`: an ``n × n`` eigh and product, in units of n² floats.

    Both must allocate at least their ``n × n`` output (ratio ≥ 1); eigh also needs a workspace.
    """
    x = torch.randn(n, n, device=device)
    spd = x @ x.T + n * torch.eye(n, device=device)
    unit = n * n * 4
    _, eig = peak_extra_bytes(lambda: torch.linalg.eigh(spd), device)
    _, mm = peak_extra_bytes(lambda: x @ x, device)
    return {"n": n, "eigh_peak_over_n2_floats": eig / unit, "matmul_peak_over_n2_floats": mm / unit}


def int_list(text: str) -> list[int]:
    """``"256,512"`` → ``[256, 512]`` (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (None with fewer than 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# --- synthetic rows ------------------------------------------------------------------------------
class RowStream:
    """Correlated batches of ``m`` synthetic rows for a ``width × width`` layer.

    ``a_t = μ + (z_t ⊙ σ_a) Q_aᵀ`` and ``g_t = (y_t ⊙ σ_g) Q_gᵀ``: ``Q`` are random orthonormal
    ``width × k`` bases (``k = min(width, latent)``), ``σ_j² ∝ j^(−decay)`` (``j = 1..k``), scaled so
    that entries of ``a`` and ``g`` have mean square 1, ``a``'s energy split ``mean_ratio : 1``
    between the mean ``μ`` (a random direction) and the fluctuations. ``z_t``, ``y_t`` (``m × k``)
    are standard normal AR(1) processes, ``z_t = √ρ z_{t−1} + √(1−ρ) ξ_t``. The gradient is
    ``∇W_t = g_tᵀa_t/m + E_t``, ``E_t`` iid normal scaled to ``noise · ‖g_tᵀa_t/m‖``.
    """

    def __init__(self, width: int, m: int, *, bias: bool, decay_a: float, decay_g: float, mean_ratio: float,
                 latent: int, rho: float, noise: float, seed: int, device: torch.device) -> None:
        self.m, self.bias, self.rho, self.noise, self.seed = m, bias, rho, noise, seed
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        k = min(width, latent)
        j = torch.arange(1, k + 1, dtype=torch.float64)

        def sigma(decay: float, energy: float) -> Tensor:
            var = j ** (-decay)
            return (var / var.sum() * energy).sqrt().to(device=device, dtype=torch.float32)

        self.sigma_a = sigma(decay_a, width / (1 + mean_ratio))
        self.sigma_g = sigma(decay_g, float(width))
        self.q_a = torch.linalg.qr(self._randn(width, k))[0]
        self.q_g = torch.linalg.qr(self._randn(width, k))[0]
        mu = self._randn(width)
        self.mu = mu * (width * mean_ratio / (1 + mean_ratio)) ** 0.5 / mu.norm()
        self.z, self.y = self._randn(m, k), self._randn(m, k)

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device)

    def rows(self) -> Rows:
        """The current batch's rows (``n = m`` samples, one row each)."""
        a = self.mu + (self.z * self.sigma_a) @ self.q_a.T
        if self.bias:
            a = torch.cat([a, a.new_ones(self.m, 1)], dim=1)
        return Rows(a=a, g=(self.y * self.sigma_g) @ self.q_g.T, n=self.m)

    def grad(self, rows: Rows, step: int) -> Tensor:
        """``∇W`` of the batch of a step; its noise is seeded by (seed, step), so calls agree."""
        grad = rows.g.T @ rows.a / rows.n
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + step)
        noise = torch.randn(grad.shape, generator=gen, device=self.device)
        return grad.add_(noise, alpha=self.noise * float(grad.norm() / noise.norm()))

    def advance(self) -> None:
        """Move to the next, correlated batch."""
        s, c = self.rho**0.5, (1 - self.rho) ** 0.5
        self.z = self.z * s + self._randn(*self.z.shape) * c
        self.y = self.y * s + self._randn(*self.y.shape) * c


# --- the methods ---------------------------------------------------------------------------------
def kron(rows: Rows) -> KronRows:
    """The curvature operator of one batch, as ``CGFAC`` builds it (a window of one)."""
    return KronRows.from_rows([rows], [1.0])


def rel_residual(op: KronRows, x: Tensor, grad: Tensor, damping: float) -> float:
    """True ``‖G X A + λX − ∇W‖ / ‖∇W‖``."""
    return float(torch.linalg.vector_norm(op.matvec(x, damping) - grad) / torch.linalg.vector_norm(grad))


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Settings:
    """What a run measures and how (from the command line)."""

    methods: list[str]
    widths: list[int]
    rows: list[int]
    bias: bool
    damping: float
    tol: float
    max_iters: int
    warm_steps: int
    rho: float
    factor_decay: float
    inv_update_steps: int
    decay_a: float
    decay_g: float
    mean_ratio: float
    latent: int
    noise: float
    warmup: int
    repeats: int
    time_budget: float
    max_seconds: float
    max_memory_gb: float
    seed: int


class LayerBench:
    """Measures every method at every (rows, width) point, skipping what exceeds the limits."""

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.s = settings
        self.device = device
        self.skip: dict[tuple[str, int], str] = {}
        self.cg = CGSolver(settings.max_iters, settings.tol, jacobi=True, warm_start=True)
        self.auto = AutoSolver(self.cg)
        self.auto_state, self.auto_step = SolverState(), 0

    def _measure(self, fn: Callable[[], Any], *, warmup: int | None = None, memory: bool = True) -> Timing:
        s = self.s
        return measure(fn, self.device, warmup=s.warmup if warmup is None else warmup, repeats=s.repeats,
                       budget_s=s.time_budget, max_s=s.max_seconds, memory=memory)

    def _cg(self, rows: Rows, grad: Tensor, damping: float, x0: Tensor | None) -> CGResult:
        return self.cg.run(kron(rows), grad, damping, x0)

    def _auto(self, rows: Rows, grad: Tensor, damping: float, x0: Tensor | None) -> tuple[str, Tensor, int | None]:
        """One step of the layer exactly as ``CGFAC(solver="auto")`` takes it (choice, CG probes,
        solve, warm start): :meth:`AutoSolver.solve`. Returns the method, X and CG iterations."""
        if x0 is not None:
            self.auto_state.solution = x0
        sol = self.auto.solve(kron(rows), grad, damping, self.auto_state, step=self.auto_step)
        return sol.method, grad if sol.x is None else sol.x, sol.stats.get("iters")

    def estimated_bytes(self, method: str, d_in: int, d_out: int, m: int) -> int:
        """A rough upper estimate of a method's peak memory, for the ``--max-memory-gb`` skip."""
        return 4 * (_FLOATS_PER_ENTRY[method] * d_in * d_out + 4 * m * (d_in + d_out) + m * m)

    def point(self, width: int, m: int, bar: tqdm) -> list[dict[str, Any]]:
        """All methods at one (width, rows) point."""
        s = self.s
        stream = RowStream(width, m, bias=s.bias, decay_a=s.decay_a, decay_g=s.decay_g,
                           mean_ratio=s.mean_ratio, latent=s.latent, rho=s.rho, noise=s.noise,
                           seed=s.seed + 7919 * width + m, device=self.device)
        batches = []
        for t in range(s.warm_steps + 1):
            batches.append(stream.rows())
            if t < s.warm_steps:
                stream.advance()
        op0 = kron(batches[0])
        d_in, d_out = op0.a.shape[1], op0.g.shape[1]
        damping = s.damping * float(op0.a.square().sum() / d_in) * float(op0.g.square().sum() / d_out)

        def grads(t: int) -> Tensor:  # rebuilt on use: a sequence of d×d gradients would not fit
            return stream.grad(batches[t], t)

        out = []
        for method in s.methods:
            bar.set_postfix_str(f"{method} w={width} rows={m}")
            base = {"method": method, "width": width, "rows": m, "d_in": d_in, "d_out": d_out,
                    "damping": damping}
            reason = self.skip.get((method, m))
            est = self.estimated_bytes(method, d_in, d_out, m)
            if reason is None and est > s.max_memory_gb * 2**30:
                reason = f"estimated memory {est / 2**30:.1f} GiB > --max-memory-gb {s.max_memory_gb}"
            if reason is not None:
                out.append({**base, "status": "skipped", "reason": reason})
                bar.update()
                continue
            rec = getattr(self, "_" + method.replace("-", "_"))(batches, grads, damping)
            rec = {**base, "status": "ok", **rec}
            if rec["max_call_s"] > s.max_seconds:
                self.skip[(method, m)] = (f"a call took {rec['max_call_s']:.0f} s > --max-seconds-per-method "
                                          f"{s.max_seconds:g} at width {width}")
            out.append(rec)
            bar.update()
        return out

    # Each method returns its record: time_ms, timed_calls, max_call_s (the slowest measured
    # call, for the time skip), peak_extra_bytes, held_curvature_bytes and its own fields.
    def _rows_held(self, batches: list[Rows]) -> int:
        op = kron(batches[0])
        return _nbytes(op.a, op.g)

    def _solve_record(self, t: Timing, x: Tensor, batches: list[Rows], grad: Tensor, damping: float,
                      held: int) -> dict[str, Any]:
        return {"time_ms": t.seconds * 1e3, "timed_calls": t.calls, "max_call_s": t.seconds,
                "peak_extra_bytes": t.peak_bytes, "held_curvature_bytes": held,
                "rel_residual": rel_residual(kron(batches[0]), x, grad, damping)}

    def _cgfac_cg_cold(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        grad = grads(0)
        t = self._measure(lambda: self._cg(batches[0], grad, damping, None))
        rec = self._solve_record(t, t.result.x, batches, grad, damping, self._rows_held(batches))
        return {**rec, "iters": t.result.iters, "converged": t.result.converged}

    def _sequence(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float,
                  step: Callable[[Rows, Tensor, Tensor | None], tuple[str, Tensor, int | None]],
                  after: Callable[[str, int | None], None]) -> dict[str, Any]:
        """A cold untimed step on batch 0, then timed warm-started steps on batches 1, 2, ...

        Stops early once a step's time exceeds ``--max-seconds-per-method``.
        """
        method, x, iters = step(batches[0], grads(0), None)
        after(method, iters)
        times: list[float] = []
        its: list[int] = []
        res: list[float] = []
        picks: Counter[str] = Counter()
        peak: int | None = None
        calls = 0
        for t in range(1, len(batches)):
            grad = grads(t)
            timing = self._measure(functools.partial(step, batches[t], grad, x),
                                   warmup=None if t == 1 else 0, memory=t == 1)
            method, x, iters = timing.result
            after(method, iters)
            peak = timing.peak_bytes if t == 1 else peak
            times.append(timing.seconds)
            calls += timing.calls
            picks[method] += 1
            if iters is not None:
                its.append(iters)
            res.append(rel_residual(kron(batches[t]), x, grad, damping))
            if timing.seconds > self.s.max_seconds:
                break
        return {"time_ms": statistics.fmean(times) * 1e3, "timed_calls": calls, "max_call_s": max(times),
                "peak_extra_bytes": peak, "held_curvature_bytes": self._rows_held(batches),
                "held_warm_start_bytes": _nbytes(x), "steps": len(times),
                "iters": statistics.fmean(its) if its else None, "iters_per_step": its,
                "rel_residual": max(res), "picks": dict(picks)}

    def _cgfac_cg_warm(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        def step(rows: Rows, grad: Tensor, x0: Tensor | None) -> tuple[str, Tensor, int | None]:
            r = self._cg(rows, grad, damping, x0)
            return "cg", r.x, r.iters

        return self._sequence(batches, grads, damping, step, lambda method, iters: None)

    def _cgfac_auto(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        self.auto_state, self.auto_step = SolverState(), 0

        def after(method: str, iters: int | None) -> None:
            self.auto_step += 1

        return self._sequence(batches, grads, damping, lambda r, g, x: self._auto(r, g, damping, x), after)

    def _cgfac_lowrank(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        grad = grads(0)
        t = self._measure(lambda: LowRankSolver().direct(kron(batches[0]), grad, damping))
        return self._solve_record(t, t.result, batches, grad, damping, self._rows_held(batches))

    def _kfac_fresh(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        grad = grads(0)
        t = self._measure(lambda: EigenSolver().direct(kron(batches[0]), grad, damping))
        return self._solve_record(t, t.result, batches, grad, damping, self._rows_held(batches))

    def _kfac_amortised(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        """Decomposition of batch 0's factors; update by batch 1 and solve with batch 1's ∇W."""
        running, eigen = RunningFactors(), EigenSolver()
        running.update(kron(batches[0]).factors(), self.s.factor_decay)
        a_f, g_f = running.operator().factors()
        eig_t = self._measure(lambda: eigen.decompose(KronFactors(a_f, g_f)))
        eig = eig_t.result
        rows1 = batches[min(1, len(batches) - 1)]

        def update() -> None:
            running.update(kron(rows1).factors(), self.s.factor_decay)

        grad = grads(min(1, len(batches) - 1))
        upd_t = self._measure(update)
        sol_t = self._measure(lambda: eig.solve(grad, damping))
        share = eig_t.seconds / self.s.inv_update_steps
        peaks = [p for p in (eig_t.peak_bytes, upd_t.peak_bytes, sol_t.peak_bytes) if p is not None]
        return {"time_ms": (upd_t.seconds + sol_t.seconds + share) * 1e3,
                "timed_calls": min(eig_t.calls, upd_t.calls, sol_t.calls),
                "max_call_s": max(eig_t.seconds, upd_t.seconds, sol_t.seconds),
                "peak_extra_bytes": max(peaks) if peaks else None,
                "held_curvature_bytes": _nbytes(a_f, g_f, eig.q_a, eig.q_g, eig.s_a, eig.s_g),
                "components_ms": {"factor_update": upd_t.seconds * 1e3, "solve": sol_t.seconds * 1e3,
                                  "eigendecomposition": eig_t.seconds * 1e3}}

    def _products(self, batches: list[Rows], explicit: bool) -> dict[str, Any]:
        op = kron(batches[0])
        gen = torch.Generator(device=self.device).manual_seed(self.s.seed)
        v = torch.randn(op.g.shape[1], op.a.shape[1], generator=gen, device=self.device)
        if explicit:
            def fn() -> Tensor:
                a_f, g_f = kron(batches[0]).factors()
                return g_f @ v @ a_f
            held = op.a.element_size() * (op.a.shape[1] ** 2 + op.g.shape[1] ** 2)
        else:
            def fn() -> Tensor:
                return kron(batches[0]).matvec(v, 0.0)
            held = _nbytes(op.a, op.g)
        t = self._measure(fn)
        return {"time_ms": t.seconds * 1e3, "timed_calls": t.calls, "max_call_s": t.seconds,
                "peak_extra_bytes": t.peak_bytes, "held_curvature_bytes": held}

    def _explicit_product(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        return self._products(batches, explicit=True)

    def _matfree_product(self, batches: list[Rows], grads: Callable[[int], Tensor], damping: float) -> dict[str, Any]:
        return self._products(batches, explicit=False)


# --- reporting -----------------------------------------------------------------------------------
def slopes(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per method and rows: log–log slopes of time, peak memory and held memory against width."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        for m in dict.fromkeys(r["rows"] for r in results):
            ok = [r for r in results if r["method"] == method and r["rows"] == m and r["status"] == "ok"]
            ws = [r["width"] for r in ok]
            out.setdefault(method, {})[str(m)] = {
                "time": loglog_slope(ws, [r["time_ms"] for r in ok]),
                "peak_memory": loglog_slope(ws, [r["peak_extra_bytes"] for r in ok]),
                "held_memory": loglog_slope(ws, [r["held_curvature_bytes"] for r in ok]),
            }
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims at width 4096 and 128 rows: CG-FAC step against K-FAC, and memory."""
    at = {r["method"]: r for r in results
          if r["width"] == TARGET_WIDTH and r["rows"] == TARGET_ROWS and r["status"] == "ok"}

    def ratio(num: str, den: str, key: str) -> float | None:
        if num in at and den in at and at[den][key]:
            return at[num][key] / at[den][key]
        return None

    checks = []
    for cgfac in ("cgfac-auto", "cgfac-cg-warm"):
        for kfac, goal in (("kfac-amortised", 5.0), ("kfac-fresh", 20.0)):
            value = ratio(kfac, cgfac, "time_ms")
            checks.append({"name": f"{cgfac} speedup vs {kfac}", "value": value, "goal": f">= {goal:g}x",
                           "met": None if value is None else value >= goal})
    mem = ratio("cgfac-cg-warm", "kfac-amortised", "held_curvature_bytes")
    checks.append({"name": "curvature memory cgfac (rows a, g) / kfac-amortised", "value": mem,
                   "goal": "<= 1/20", "met": None if mem is None else mem <= 1 / 20})
    if "cgfac-cg-warm" in at and "kfac-amortised" in at:
        w = at["cgfac-cg-warm"]
        mem_x = (w["held_curvature_bytes"] + w["held_warm_start_bytes"]) / at["kfac-amortised"]["held_curvature_bytes"]
    else:
        mem_x = None
    checks.append({"name": "memory cgfac (rows + warm-start X) / kfac-amortised", "value": mem_x,
                   "goal": "<= 1/20", "met": None if mem_x is None else mem_x <= 1 / 20})
    return checks


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def format_targets(checks: list[dict[str, Any]]) -> str:
    lines = [f"Targets at width {TARGET_WIDTH}, {TARGET_ROWS} rows:"]
    for c in checks:
        verdict = "NOT MEASURED" if c["met"] is None else ("MET" if c["met"] else "MISSED")
        lines.append(f"  {c['name']}: {_fmt(c['value'])} (target {c['goal']}): {verdict}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """Tables per rows value: time, CG iterations and auto's picks, peak and held memory."""
    results, sl = report["results"], report["slopes"]
    widths = sorted({r["width"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    cfg = report["config"]
    lines = ["# cgfac-bench layer", "",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['threads']} threads, "
             f"torch {report['machine']['torch']}, device {report['machine']['device']}.",
             f"Layer width × width (bias column: {cfg['bias']}), float32, relative damping {cfg['damping']:g}, "
             f"CG tol {cfg['tol']:g}, max {cfg['max_iters']} iterations, "
             f"{cfg['warm_steps']} warm steps (ρ = {cfg['rho']:g}).",
             "Time: median ms per step (cg-warm/auto: mean over the warm steps). Memory in MiB.", ""]
    head = "| method | " + " | ".join(str(w) for w in widths) + " | slope |"
    rule = "|---" * (len(widths) + 2) + "|"

    def cell(r: dict[str, Any] | None, fn: Callable[[dict[str, Any]], str]) -> str:
        if r is None:
            return ""
        return "skip" if r["status"] != "ok" else fn(r)

    for m in sorted({r["rows"] for r in results}):
        at = {(r["method"], r["width"]): r for r in results if r["rows"] == m}
        for title, key, fn in (
            ("time (ms)", "time", lambda r: _fmt(r["time_ms"])),
            ("peak extra memory during the step (MiB)", "peak_memory",
             lambda r: _fmt(None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / MIB)),
            ("curvature memory held between steps (MiB; +X: cg warm start)", "held_memory",
             lambda r: _fmt(r["held_curvature_bytes"] / MIB) + (
                 f" +{_fmt(r['held_warm_start_bytes'] / MIB)}" if "held_warm_start_bytes" in r else "")),
        ):
            lines += [f"## rows = {m}: {title}", "", head, rule]
            for method in methods:
                cells = [cell(at.get((method, w)), fn) for w in widths]
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(sl[method][str(m)][key], 2)} |")
            lines.append("")
        lines += [f"## rows = {m}: CG iterations (mean per step), max true relative residual, auto's picks", "",
                  head.replace(" slope |", ""), "|---" * (len(widths) + 1) + "|"]
        for method in ("cgfac-cg-cold", "cgfac-cg-warm", "cgfac-auto"):
            if method in methods:
                cells = [cell(at.get((method, w)), lambda r: " ".join(filter(None, [
                    _fmt(r.get("iters")), f"res {_fmt(r['rel_residual'], 2)}",
                    ",".join(f"{k}×{v}" for k, v in r.get("picks", {}).items())]))) for w in widths]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    skipped = [r for r in results if r["status"] != "ok"]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {r['method']} width {r['width']} rows {r['rows']}: {r['reason']}"
                                       for r in skipped] + [""]
    lines += ["## Targets", "", "```", format_targets(report["targets"]), "```", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Log–log time (top) and memory (bottom: peak solid, held dotted) against width, per rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    rows = sorted({r["rows"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(2, len(rows), figsize=(5 * len(rows), 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, m in enumerate(rows):
        for i, method in enumerate(methods):
            ok = sorted((r for r in results if r["rows"] == m and r["method"] == method and r["status"] == "ok"),
                        key=lambda r: r["width"])
            if not ok:
                continue
            c = colors[i % len(colors)]
            ws = [r["width"] for r in ok]
            axes[0, col].plot(ws, [r["time_ms"] for r in ok], "o-", color=c, label=method)
            peak = [(r["width"], r["peak_extra_bytes"] / MIB) for r in ok if r["peak_extra_bytes"]]
            if peak:
                axes[1, col].plot(*zip(*peak), "o-", color=c, label=f"{method} peak")
            axes[1, col].plot(ws, [r["held_curvature_bytes"] / MIB for r in ok], ":", color=c)
        for ax, ylabel in ((axes[0, col], "time per step (ms)"), (axes[1, col], "memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0, col].set_title(f"{m} rows")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=6, title="dotted: held curvature", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=int_list, default=None,
                        help=f"comma-separated widths (default {','.join(map(str, WIDTHS))})")
    parser.add_argument("--rows", type=int_list, default=None,
                        help=f"comma-separated curvature rows (default {','.join(map(str, ROWS))})")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--quick", action="store_true",
                        help=f"widths {','.join(map(str, QUICK_WIDTHS))}, rows {','.join(map(str, QUICK_ROWS))}, "
                             "3 repeats, 4 warm steps (explicit options still win)")
    parser.add_argument("--bias", action="store_true", help="append the ones column (d_in = width + 1)")
    parser.add_argument("--damping", type=float, default=30.0,
                        help="λ relative to mean diag(A)·mean diag(G) of the first batch (default 30: "
                             "the MLP 784-512-256-10's hidden layers at init with λ=1e-3)")
    parser.add_argument("--tol", type=float, default=1e-3, help="CG relative residual tolerance")
    parser.add_argument("--max-iters", type=int, default=100, help="CG iteration cap")
    parser.add_argument("--warm-steps", type=int, default=None,
                        help="timed warm-started steps per sequence (default 10; --quick: 4)")
    parser.add_argument("--rho", type=float, default=0.9, help="batch-to-batch correlation ρ of the rows")
    parser.add_argument("--factor-decay", type=float, default=0.95, help="K-FAC running-average decay")
    parser.add_argument("--inv-update-steps", type=int, default=10, help="K-FAC steps per eigendecomposition")
    parser.add_argument("--decay-a", type=float, default=0.5, help="activation spectrum σ_j² ∝ j^-decay")
    parser.add_argument("--decay-g", type=float, default=1.2, help="gradient spectrum σ_j² ∝ j^-decay")
    parser.add_argument("--mean-ratio", type=float, default=3.0, help="activation mean : fluctuation energy")
    parser.add_argument("--latent", type=int, default=1024, help="latent dimension k of the rows (≤ width)")
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise added to ∇W")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (≥ 1; the first probes memory)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls, median (default 5; --quick: 3)")
    parser.add_argument("--time-budget", type=float, default=10.0,
                        help="stop repeating once this many seconds of timed calls are spent")
    parser.add_argument("--max-seconds-per-method", type=float, default=120.0,
                        help="a call longer than this skips the method's larger widths (same rows)")
    parser.add_argument("--max-memory-gb", type=float, default=8.0, help="skip points estimated above this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("runs/layer"), help="output directory")


def settings_from(args: argparse.Namespace) -> Settings:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"cgfac-bench layer: unknown method(s) {unknown}; choose from {list(METHODS)}")
    quick = args.quick
    warm_steps = args.warm_steps or (4 if quick else 10)
    repeats = args.repeats or (3 if quick else 5)
    if args.warmup < 1 or repeats < 1 or warm_steps < 1:
        raise SystemExit("cgfac-bench layer: --warmup, --repeats and --warm-steps must be >= 1")
    return Settings(
        methods=methods, widths=args.widths or list(QUICK_WIDTHS if quick else WIDTHS),
        rows=args.rows or list(QUICK_ROWS if quick else ROWS), bias=args.bias, damping=args.damping,
        tol=args.tol, max_iters=args.max_iters, warm_steps=warm_steps, rho=args.rho,
        factor_decay=args.factor_decay, inv_update_steps=args.inv_update_steps, decay_a=args.decay_a,
        decay_g=args.decay_g, mean_ratio=args.mean_ratio, latent=args.latent, noise=args.noise,
        warmup=args.warmup, repeats=repeats, time_budget=args.time_budget,
        max_seconds=args.max_seconds_per_method, max_memory_gb=args.max_memory_gb, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    s = settings_from(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    torch.manual_seed(s.seed)
    probe = check_memory_probe(device)
    calibration = calibrate(str(torch.empty(0, device=device).device), torch.float32)
    bench = LayerBench(s, device)
    results: list[dict[str, Any]] = []
    total = len(s.rows) * len(s.widths) * len(s.methods)
    with tqdm(total=total, desc="layer", unit="point") as bar:
        for m in s.rows:
            for width in sorted(s.widths):
                results += bench.point(width, m, bar)
    report = {"machine": machine_info(device), "config": vars(s), "memory_probe_check": probe,
              "cost_model_calibration": dataclasses.asdict(calibration), "results": results}
    report["slopes"] = slopes(results)
    report["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer.json").write_text(json.dumps(report, indent=2))
    (args.out / "layer.md").write_text(markdown(report))
    plot(report, args.out / "layer.png")
    print(markdown(report))
    print(f"wrote {args.out / 'layer.json'}, {args.out / 'layer.md'}, {args.out / 'layer.png'}")
    return 0
