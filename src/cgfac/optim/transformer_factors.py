"""TransformerKFAC's factors (:mod:`cgfac.optim.transformer_kfac`): the rows its hooks sample, the factors'
statistics averaged over the processes, and each side's damped power refreshed on schedule.

Per hidden layer the forward hook keeps ``rows`` sampled input rows ``a`` and, through a hook on the
output, the same positions' gradient rows ``g`` (:class:`RowRecorder`, on refresh steps only);
:class:`FactorRefresh` turns them into ``F̂ = XᵀX/n`` (``A`` from ``a``, ``G`` from ``g``), the running
factors ``F ← β_f F + (1 − β_f) F̂`` and, every ``eig_every`` steps, the damped powers
``(F + λI)^p`` (:func:`damped_power`, :func:`power_matrix`) or Cholesky factors (:func:`damped_cholesky`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cgfac.curvature.kron import eigh, factor_eig
from cgfac.layers.experts import ExpertsGroup, product_hooks

__all__ = ["FactorRefresh", "FactorSettings", "LayerRows", "RowRecorder", "Side", "damped_cholesky", "damped_power",
           "factor_from_cholesky", "factor_from_power", "lowrank_power", "lowrank_running_factor",
           "power_matrix", "relative_damping"]


def relative_damping(trace: float, dim: int, damping: float) -> float:
    """``λ = damping · tr F / d`` (relative to the mean eigenvalue), or ``damping`` itself where that is
    not positive (a zero factor)."""
    lam = damping * trace / dim
    return lam if lam > 0 else damping


def damped_power(s: Tensor, q: Tensor, damping: float, dim: int, power: float) -> tuple[Tensor, Tensor, float]:
    """``(q, coeff, base)`` with ``(F + λI)^p v = base·v + q diag(coeff) qᵀ v`` for ``F = q diag(s) qᵀ``.

    ``λ = damping · Σs / dim`` (relative to the mean eigenvalue; ``Σs = tr F``), ``base = λ^p``,
    ``coeff = (s + λ)^p − λ^p``. ``q`` (``dim × k``) may hold fewer than ``dim`` columns (the rows'
    span): the formula is exact for the rank-``k`` ``F``.
    """
    lam = relative_damping(float(s.sum()), dim, damping)
    base = lam**power
    return q, (s + lam).pow(power) - base, base


class Side:
    """One factor's damped power: dense ``P`` (``d × d``, nothing else kept) or low-rank ``(q, coeff, base)``;
    or (``"spectral"``) the Cholesky factor ``L`` of ``B = F + λI``, lower triangular."""

    __slots__ = ("base", "chol", "coeff", "dense", "q")

    def __init__(self, q: Tensor | None, coeff: Tensor | None, base: float, dense: Tensor | None,
                 chol: Tensor | None = None) -> None:
        self.q, self.coeff, self.base, self.dense, self.chol = q, coeff, base, dense, chol

    @classmethod
    def power(cls, q: Tensor, coeff: Tensor, base: float) -> Side:
        """The dense ``P = q diag(coeff + base) qᵀ`` (``q`` square)."""
        return cls.dense_power((q * (coeff + base)) @ q.T)

    @classmethod
    def dense_power(cls, dense: Tensor) -> Side:
        """The dense ``P`` itself."""
        return cls(None, None, 0.0, dense)

    @classmethod
    def cholesky(cls, low: Tensor) -> Side:
        """``"spectral"``'s Cholesky factor ``L`` of ``B = F + λI``."""
        return cls(None, None, 0.0, None, low)

    @classmethod
    def lowrank(cls, q: Tensor, coeff: Tensor, base: float) -> Side:
        return cls(q, coeff, base, None)

    def right(self, m: Tensor) -> Tensor:
        """``M P``."""
        if self.dense is not None:
            return m @ self.dense
        assert self.q is not None and self.coeff is not None
        return torch.addmm(m, (m @ self.q) * self.coeff, self.q.T, beta=self.base)

    def left(self, m: Tensor) -> Tensor:
        """``P M``."""
        if self.dense is not None:
            return self.dense @ m
        assert self.q is not None and self.coeff is not None
        return torch.addmm(m, self.q, self.coeff[:, None] * (self.q.T @ m), beta=self.base)

    # "spectral": a whitening X (X Xᵀ = B⁻¹): X = L⁻ᵀ from Cholesky, or the symmetric B^{-1/2} = P
    def whiten_right(self, m: Tensor) -> Tensor:
        """``M X`` (``M L⁻ᵀ``)."""
        if self.chol is None:
            return self.right(m)
        return torch.linalg.solve_triangular(self.chol.T, m, upper=True, left=False)

    def unwhiten_right(self, o: Tensor) -> Tensor:
        """``O Xᵀ`` (``O L⁻¹``)."""
        if self.chol is None:
            return self.right(o)
        return torch.linalg.solve_triangular(self.chol, o, upper=False, left=False)

    def whiten_left(self, m: Tensor) -> Tensor:
        """``Xᵀ M`` (``L⁻¹ M``)."""
        if self.chol is None:
            return self.left(m)
        return torch.linalg.solve_triangular(self.chol, m, upper=False)

    def unwhiten_left(self, o: Tensor) -> Tensor:
        """``X O`` (``L⁻ᵀ O``)."""
        if self.chol is None:
            return self.left(o)
        return torch.linalg.solve_triangular(self.chol.T, o, upper=True)


def _spd_inverse(matrix: Tensor) -> Tensor | None:
    """``matrix⁻¹`` of a symmetric positive definite matrix by Cholesky (``L Lᵀ``, then ``L⁻ᵀ L⁻¹``:
    about ``d³`` flops against the ``~9 d³`` of a symmetric eigendecomposition), or None where the
    factorisation fails (not positive definite in this precision)."""
    low, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(low)
    return inverse if bool(torch.isfinite(inverse).all()) else None


def _damped(factor: Tensor, damping: float) -> Tensor:
    """A copy of ``F + λI``, ``λ = damping · tr(F) / d`` (``damping`` itself where ``tr F = 0``)."""
    shifted = factor.clone()
    shifted.diagonal().add_(relative_damping(float(factor.diagonal().sum()), factor.shape[0], damping))
    return shifted


def power_matrix(factor: Tensor, damping: float, power: float) -> Tensor:
    """The dense damped power ``P = (F + λI)^p``, ``λ = damping · tr(F) / d`` (:func:`damped_power`).

    ``p = −1`` (Newton-Muon's): by Cholesky, no eigendecomposition (:func:`_spd_inverse`); other
    powers, or a failed Cholesky: from ``F = Q diag(s) Qᵀ`` (``s ≥ 0``), ``P = Q diag((s + λ)^p) Qᵀ``.
    Raises ``torch.linalg.LinAlgError`` where the eigendecomposition fails too.
    """
    if power == -1.0 and (inverse := _spd_inverse(_damped(factor, damping))) is not None:
        return inverse
    s, q = eigh(factor)
    side = Side.power(*damped_power(s, q, damping, factor.shape[0], power))
    assert side.dense is not None
    return side.dense


def damped_cholesky(factor: Tensor, damping: float) -> Tensor:
    """``L``, lower triangular, with ``L Lᵀ = F + λI``, ``λ = damping · tr(F) / d``; retried in float64
    once; raises ``torch.linalg.LinAlgError`` where both fail."""
    shifted = _damped(factor, damping)
    low, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0 or not bool(torch.isfinite(low).all()):
        low, info = torch.linalg.cholesky_ex(shifted.double())
        if int(info) != 0 or not bool(torch.isfinite(low).all()):
            raise torch.linalg.LinAlgError("Cholesky factorisation of the damped factor failed in float64")
        low = low.to(factor.dtype)
    return low


def factor_from_cholesky(low: Tensor, damping: float) -> Tensor:
    """The factor ``F`` of :func:`damped_cholesky`'s ``L``: ``F = L Lᵀ − λI``, ``λ = damping · ‖L‖²_F /
    ((1 + damping) d)`` (``tr(L Lᵀ) = (1 + damping) tr F``)."""
    shifted = low @ low.T
    lam = damping * float(low.square().sum()) / ((1.0 + damping) * low.shape[0])
    shifted.diagonal().sub_(lam)
    return shifted


def factor_from_power(power_matrix: Tensor, damping: float, power: float) -> Tensor:
    """The factor ``F`` whose damped power (:func:`damped_power`) is ``P = (F + λI)^p``, ``p < 0``.

    ``tr(F + λI) = (1 + damping)·tr F`` gives ``λ = damping · tr(F + λI) / ((1 + damping) d)`` and
    ``F = (F + λI) − λI``, where ``F + λI = P^{1/p}``: for ``p = −1`` and ``p = −1/2``, ``P⁻¹`` and
    ``(P⁻¹)²`` by Cholesky (:func:`_spd_inverse`); otherwise (or where Cholesky fails) from
    ``P = Q diag(μ) Qᵀ``, ``F + λI = Q diag(μ^{1/p}) Qᵀ``, with the eigenvalues of ``F`` clamped at 0.
    """
    d = power_matrix.shape[0]
    if power in (-1.0, -0.5) and (inverse := _spd_inverse(power_matrix)) is not None:
        shifted = inverse if power == -1.0 else inverse @ inverse
        shifted = (shifted + shifted.T) / 2
        lam = damping * float(shifted.diagonal().sum()) / ((1.0 + damping) * d)
        shifted.diagonal().sub_(lam)
        return shifted
    mu, q = eigh(power_matrix)
    shifted_ev = mu.clamp_min(torch.finfo(mu.dtype).tiny).pow(1.0 / power)
    lam = damping * float(shifted_ev.sum()) / ((1.0 + damping) * d)
    return (q * (shifted_ev - lam).clamp_min(0.0)) @ q.T


@dataclass
class FactorSettings:
    """The factor settings that :class:`~cgfac.optim.transformer_kfac.TransformerKFAC`, its
    :class:`RowRecorder` and its :class:`FactorRefresh` share (one object: a change made through the
    optimizer, ``opt.damping = 0.1``, reaches the next refresh)."""

    direction: str
    sides: str
    factors: str
    power: float
    damping: float
    rows: int | None
    factor_decay: float
    factor_every: int
    eig_every: int
    rank: int | None = None

    @property
    def compact(self) -> bool:
        """Whether each side keeps its power alone: the running factor is refreshed and decomposed on
        the same steps (``factor_every == eig_every``) and recovered from the power when rows arrive."""
        return self.factors == "ema" and not self.direction.startswith("ekfac") and \
            self.factor_every == self.eig_every


def lowrank_running_factor(old: tuple[Tensor, Tensor, Tensor] | None, rows: Tensor, decay: float,
                           rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The running factor ``F ← β F + (1 − β) XᵀX`` kept as its top ``rank`` eigenpairs and an isotropic
    rest, ``F = Q diag(s) Qᵀ + τ (I − QQᵀ)`` (``Q``: ``d × k`` orthonormal, ``k ≤ rank``); returns
    ``(Q, s, τ)``. ``rows``: ``X`` (``n × d``, already scaled so that ``F̂ = XᵀX``); ``old``: the
    previous ``(Q, s, τ)`` or None (then ``F = F̂``).

    ``β F_old + (1 − β) XᵀX = βτ I + RᵀR`` with ``R = [diag(√(β(s − τ))) Qᵀ; √(1 − β) X]``
    (``(k + n) × d``; ``s ≥ τ``: the kept eigenvalues are the largest), so the update is exact in
    ``O(d (k + n)²)`` (:func:`~cgfac.curvature.kron.factor_eig`: QR of ``Rᵀ``, a ``(k + n)²``
    eigendecomposition; no ``d × d`` matrix), then truncated to its top ``rank`` eigenpairs with the
    trace kept: ``τ = (tr F − Σ s) / (d − k)``, ``tr F = β tr F_old + (1 − β) ‖X‖²_F``."""
    d = rows.shape[1]
    if old is None:
        r, shift, trace = rows, 0.0, float(rows.square().sum())
    else:
        q, ev, tau = old
        shift = decay * float(tau)
        top = (decay * (ev - tau).clamp_min(0.0)).sqrt()[:, None] * q.T
        r = torch.cat([top, math.sqrt(1.0 - decay) * rows.to(q.dtype)])
        trace = decay * (float(ev.sum()) + float(tau) * (d - q.shape[1])) + (1.0 - decay) * float(rows.square().sum())
    sigma, u = factor_eig(r)  # ascending
    k = min(rank, sigma.shape[0])
    q_new, s_new = u[:, -k:], sigma[-k:] + shift
    tau_new = max(trace - float(s_new.sum()), 0.0) / (d - k) if d > k else 0.0
    return q_new, s_new, s_new.new_tensor(tau_new)


def lowrank_power(q: Tensor, ev: Tensor, tau: Tensor, damping: float, power: float) -> Side:
    """``(F + λI)^p = (τ + λ)^p (I − QQᵀ) + Q diag((s + λ)^p) Qᵀ`` of :func:`lowrank_running_factor`'s
    ``F``, ``λ = damping · tr F / d`` (as :func:`damped_power`), as a :class:`Side`: low-rank where
    ``2k < d`` (two ``k``-wide products per step), else the dense ``d × d`` power (one product, as cheap)."""
    d, k = q.shape
    lam = relative_damping(float(ev.sum()) + float(tau) * (d - k), d, damping)
    base = (float(tau) + lam) ** power
    coeff = (ev + lam).pow(power) - base
    if 2 * k >= d:
        dense = (q * coeff) @ q.T
        dense.diagonal().add_(base)
        return Side.dense_power(dense)
    return Side.lowrank(q, coeff, base)


class LayerRows:
    """Rows ``a`` (inputs) and ``g`` (output gradients) of one hidden layer, sampled per forward."""

    def __init__(self, module: nn.Module, transposed: bool, expert: bool = False) -> None:
        self.module, self.transposed, self.expert = module, transposed, expert
        self.a: list[Tensor] = []
        self.g: list[Tensor] = []

    def clear(self) -> None:
        self.a.clear()
        self.g.clear()




class RowRecorder:
    """Forward hooks that sample each hidden layer's rows on the steps that use them.

    ``captures``: per hidden weight, its :class:`LayerRows`; ``expert_captures``: per 3-D expert
    parameter, one per expert (rows: the expert's routed tokens). ``steps_taken`` (the optimizer's
    step count, kept here) decides which forwards record: every one with ``factors="rows"``, else
    those of steps ``≡ 0 (mod factor_every)``. ``generator`` draws the sampled positions."""

    def __init__(self, hidden: list[tuple[str, nn.Module]], experts: list[tuple[str, ExpertsGroup]], *,
                 settings: FactorSettings, seed: int, active: bool) -> None:
        self.settings = settings
        self.steps_taken = 0
        self.captures = {m.weight: LayerRows(m, type(m).__name__ == "Conv1D") for _, m in hidden}
        self.generator = torch.Generator().manual_seed(seed)
        self.handles: list[RemovableHandle] = [m.register_forward_hook(self.hook) for _, m in hidden if active]
        self.by_module = {m: self.captures[m.weight] for _, m in hidden}
        self.expert_captures: dict[Tensor, list[LayerRows]] = {
            p: [LayerRows(group.module, group.transposed[pname], expert=True) for _ in range(p.shape[0])]
            for _, group in experts for pname, p in group.params.items()}
        if active:
            for _, group in experts:
                self.handles += self.attach_experts(group)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Record this forward's sampled input rows and, through a hook on the output, its gradient rows."""
        # rows only where they are used
        due = self.settings.factors == "rows" or self.steps_taken % self.settings.factor_every == 0
        if not (due and module.training and torch.is_grad_enabled()):
            return
        if not (isinstance(output, Tensor) and output.requires_grad and args and isinstance(args[0], Tensor)):
            return
        cap = self.by_module[module]
        a = args[0].detach().reshape(-1, args[0].shape[-1])
        idx = None
        rows = self.settings.rows
        if rows is not None and rows < a.shape[0]:
            idx = torch.randperm(a.shape[0], generator=self.generator)[:rows].to(a.device)
            a = a[idx]
        cap.a.append(a)

        def grad_rows(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])
            cap.g.append(g[idx] if idx is not None else g)

        output.register_hook(grad_rows)

    def attach_experts(self, group: ExpertsGroup) -> list[RemovableHandle]:
        """Hooks recording each expert's sampled routed rows (:mod:`cgfac.layers.experts`' products)."""
        def start(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            due = self.steps_taken % self.settings.factor_every == 0
            if not (due and module.training and torch.is_grad_enabled()):
                return None

            def found(pname: str, segments: list[tuple[int, int, int]], transposed: bool, x: Tensor,
                      out: Tensor) -> None:
                caps = self.expert_captures[group.params[pname]]
                if not out.requires_grad or transposed != caps[0].transposed:
                    return
                rows_x = x.detach().reshape(-1, x.shape[-1])
                picks: list[tuple[LayerRows, Tensor]] = []
                for e, lo, hi in segments:
                    idx = torch.arange(lo, hi, device=x.device)
                    rows = self.settings.rows
                    if rows is not None and rows < hi - lo:
                        idx = idx[torch.randperm(hi - lo, generator=self.generator)[:rows].to(x.device)]
                    caps[e].a.append(rows_x[idx])
                    picks.append((caps[e], idx))

                def grad_rows(grad: Tensor) -> None:
                    g = grad.detach().reshape(-1, grad.shape[-1])
                    for cap, idx in picks:
                        cap.g.append(g[idx])

                out.register_hook(grad_rows)

            return found

        pre, post = product_hooks(group.params, start)
        return [group.module.register_forward_pre_hook(pre, with_kwargs=True),
                group.module.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def remove(self) -> None:
        """Remove the capture hooks (the optimizer is then unusable for factor updates)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def all(self) -> list[LayerRows]:
        """Every layer's and every expert's rows."""
        return [*self.captures.values(), *(c for caps in self.expert_captures.values() for c in caps)]

    def clear(self) -> None:
        for cap in self.all():
            cap.clear()


class FactorRefresh:
    """Each hidden layer's factor statistics and damped powers (the optimizer's shared
    :class:`FactorSettings`); ``factor_failures`` counts the decompositions that failed (the layer
    keeps its previous powers)."""

    def __init__(self, settings: FactorSettings, process_group: Any) -> None:
        self.settings = settings
        self.process_group = process_group
        self.factor_failures = 0

    def layer_sides(self, d_out: int, d_in: int) -> tuple[str, ...]:
        """The sides a ``d_out × d_in`` layer preconditions: ``"a"`` (input) and/or ``"g"`` (output);
        ``sides="smaller"``: the smaller dimension's factor (``d × d``), the input's on a tie."""
        if self.settings.sides == "both":
            return ("a", "g")
        if self.settings.sides == "smaller" and d_out < d_in:
            return ("g",)
        return ("a",)

    @staticmethod
    def rows(parts: list[Tensor]) -> Tensor:
        """The captured rows as one matrix, in at least float32."""
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return x.float() if x.element_size() < 4 else x

    def world(self) -> int:
        """Processes sharing the factors (1 without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def mean_outer(self, parts: list[Tensor]) -> Tensor:
        """``F̂ = XᵀX / n`` of this step's rows ``X``, averaged over the processes."""
        x = self.rows(parts)
        f = x.T @ x / x.shape[0]
        if self.world() > 1:
            dist.all_reduce(f, op=dist.ReduceOp.AVG, group=self.process_group)
        return f

    def expert_outer(self, cap: LayerRows, sides: tuple[str, ...], state: dict[str, Any],
                     steps_taken: int) -> dict[str, Tensor] | None:
        """An expert's ``F̂ = Σ XᵀX / Σ n`` over the processes' routed rows on a refresh step (every
        rank joins the reduction, with or without rows), or None where no process had rows."""
        if steps_taken % self.settings.factor_every != 0:
            return None
        dims, like = {"a": state["dims"][1], "g": state["dims"][0]}, state["like"]
        have = all(getattr(cap, s) for s in sides)
        sums = {s: (lambda x: (x.T @ x).to(like.dtype))(self.rows(getattr(cap, s))) if have else
                like.new_zeros(dims[s], dims[s]) for s in sides}
        count = like.new_tensor([float(sum(t.shape[0] for t in cap.a)) if have else 0.0])
        if self.world() > 1:
            for t in [*sums.values(), count]:
                dist.all_reduce(t, group=self.process_group)
        total = float(count)
        return {s: f / total for s, f in sums.items()} if total > 0 else None

    def gathered_rows(self, parts: list[Tensor]) -> Tensor:
        """Every process's rows ``X`` (equal counts per rank), scaled by ``1/√n`` so ``F̂ = XᵀX``."""
        x = self.rows(parts)
        if (world := self.world()) > 1:
            chunks = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(chunks, x.contiguous(), group=self.process_group)
            x = torch.cat(chunks)
        return x / math.sqrt(x.shape[0])

    def refresh_from_rows(self, cap: LayerRows, state: dict[str, Any], sides: tuple[str, ...]) -> None:
        """``factors="rows"``: each side's power from this step's rows alone (low-rank, exact)."""
        for s in sides:
            rows = self.gathered_rows(getattr(cap, s))
            ev, q = factor_eig(rows)
            p = -0.5 if self.settings.direction == "spectral" else self.settings.power
            state[f"side_{s}"] = Side.lowrank(*damped_power(ev, q, self.settings.damping, rows.shape[1], p))

    def is_lowrank(self, cap: LayerRows, dim: int) -> bool:
        """Whether a side of this ``dim`` keeps its running factor low-rank (``rank < dim``; not an
        expert's, whose statistics are reduced as ``d × d`` sums)."""
        rank = self.settings.rank
        return rank is not None and rank < dim and not cap.expert

    def refresh_lowrank(self, cap: LayerRows, state: dict[str, Any], sides: tuple[str, ...]) -> None:
        """The low-rank running factors of ``sides`` (:func:`lowrank_running_factor`) and their powers,
        on every step with rows: kept per side as ``basis_*``, ``eigvals_*``, ``tail_*``."""
        rank = self.settings.rank
        assert rank is not None
        for s in sides:
            old = (state[f"basis_{s}"], state[f"eigvals_{s}"], state[f"tail_{s}"]) if f"basis_{s}" in state else None
            rows = self.gathered_rows(getattr(cap, s))
            try:
                q, ev, tau = lowrank_running_factor(old, rows, self.settings.factor_decay, rank)
            except (torch.linalg.LinAlgError, RuntimeError):
                self.factor_failures += 1
                continue
            state[f"basis_{s}"], state[f"eigvals_{s}"], state[f"tail_{s}"] = q, ev, tau
            state[f"side_{s}"] = lowrank_power(q, ev, tau, self.settings.damping, self.settings.power)

    def side_from_state(self, state: dict[str, Any], s: str) -> Side | None:
        """Side ``s``'s power rebuilt from a loaded state (``power_*``, ``chol_*`` or the low-rank
        ``basis_*``), or None where it has none yet."""
        if f"power_{s}" in state:
            return Side.dense_power(state[f"power_{s}"])
        if f"chol_{s}" in state:
            return Side.cholesky(state[f"chol_{s}"])
        if f"basis_{s}" in state:
            return lowrank_power(state[f"basis_{s}"], state[f"eigvals_{s}"], state[f"tail_{s}"],
                                 self.settings.damping, self.settings.power)
        return None

    def eig(self, f: Tensor) -> tuple[Tensor, Tensor] | None:
        """``F = Q diag(s) Qᵀ`` (``s ≥ 0``; retried in float64 once), or None where it fails."""
        try:
            return eigh(f)
        except (torch.linalg.LinAlgError, RuntimeError):
            return None

    def refresh(self, cap: LayerRows, state: dict[str, Any], steps_taken: int,
                dims: tuple[int, ...]) -> None:
        """This step's factor statistics into the layer's state, and its damped powers where due.

        Kept per side: ``"ekfac"``: the running factor and its eigensystem ``eig_*``; ``"ortho"`` and
        ``"power"``: the running factor and the dense power ``power_*``, or the power alone where the
        factor is refreshed and decomposed on the same steps (``factor_every == eig_every``: the
        running factor is recovered from the power when the next rows arrive,
        :func:`factor_from_power`), one ``d × d`` matrix per side. ``dims``: the layer's ``(d_out, d_in)``."""
        sides = self.layer_sides(dims[0], dims[1])
        have = all(getattr(cap, s) for s in sides)
        if self.settings.factors == "rows":
            if have:
                self.refresh_from_rows(cap, state, sides)
            return
        lowrank = tuple(s for s in sides if self.is_lowrank(cap, dims[1] if s == "a" else dims[0]))
        if lowrank and have:
            self.refresh_lowrank(cap, state, lowrank)
        sides = tuple(s for s in sides if s not in lowrank)
        compact = self.settings.compact
        fresh: dict[str, Tensor] = {}
        batch = self.expert_outer(cap, sides, state, steps_taken) if cap.expert else (
            {s: self.mean_outer(getattr(cap, s)) for s in sides} if have else None)
        if batch is not None:  # captured on refresh steps only (the hook)
            for s in sides:
                f = batch[s]
                old = state.get(f"factor_{s}")
                if old is None and compact and f"power_{s}" in state:
                    old = factor_from_power(state[f"power_{s}"], self.settings.damping, self.settings.power)
                if old is None and compact and f"chol_{s}" in state:
                    old = factor_from_cholesky(state[f"chol_{s}"], self.settings.damping)
                fresh[s] = f if old is None else old.lerp_(f, 1 - self.settings.factor_decay)
                if not compact:
                    state[f"factor_{s}"] = fresh[s]
        for s in sides:
            factor: Tensor | None = fresh.get(s) if compact else state.get(f"factor_{s}")
            decomposed = any(f"{k}_{s}" in state for k in ("eig", "power", "chol"))
            if factor is None or (not compact and state["step"] % self.settings.eig_every != 0 and decomposed):
                continue
            if self.settings.direction.startswith("ekfac"):
                eig = self.eig(factor)
                if eig is None:
                    self.factor_failures += 1
                else:
                    state[f"eig_{s}"] = eig
                continue
            try:
                if self.settings.direction == "spectral":
                    low = damped_cholesky(factor, self.settings.damping)
                    state[f"chol_{s}"] = low
                    state[f"side_{s}"] = Side.cholesky(low)
                    continue
                dense = power_matrix(factor, self.settings.damping, self.settings.power)
            except (torch.linalg.LinAlgError, RuntimeError):
                self.factor_failures += 1
                continue
            state[f"power_{s}"] = dense
            state[f"side_{s}"] = Side.dense_power(dense)
