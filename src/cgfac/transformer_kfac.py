"""A Kronecker-factored optimizer for transformers: K-FAC's factors on the hidden matrices, AdamW on the rest.

Routing (:func:`hidden_matrices`): the weight of every ``nn.Linear`` and Hugging Face ``Conv1D``
that is neither tied to an embedding nor the output layer (the last module holding a 2-D weight)
takes the Kronecker-factored direction below; every other trainable parameter (embeddings, the
head, norms, biases) takes AdamW, with weight decay on the parameters of two or more dimensions
only (nanoGPT's convention). One ``lr`` and one ``weight_decay`` serve both (the hidden update is
scaled to AdamW's RMS), and an ``lr`` scheduler scales every group together.

Mixture-of-experts layers (3-D expert parameters ``E × d_out × d_in``, :mod:`cgfac.layers.experts`):
each expert's slice ``W_e`` is a hidden matrix of its own (route ``"kron-experts"``), with its own
momentum and factors from the tokens routed to it (every rank joins the factors' reduction, with or
without tokens); an expert that received no token keeps its factors.

Per hidden layer, ``W``: ``d_out × d_in`` (a ``Conv1D``'s ``d_in × d_out`` weight is used
transposed), the factors come from the layer's inputs ``a`` and output gradients ``g`` at every
position the forward saw (``rows`` of them sampled per step, or all)::

    A = E[a aᵀ]  (d_in × d_in),   G = E[g gᵀ]  (d_out × d_out)

``factors="ema"``: running averages ``F ← β_f F + (1 − β_f) F̂`` refreshed every ``factor_every``
steps and eigendecomposed every ``eig_every`` steps, ``F = Q diag(s) Qᵀ`` (for ``p = −1`` the power
``(F + λI)⁻¹`` comes from a Cholesky factorisation instead, about a quarter of the eigendecomposition's
time at ``d = 1024`` on one CPU thread: :func:`power_matrix`). ``factors="rows"``: this
step's ``r`` rows alone, through CG-FAC's low-rank eigensystem (QR of the rows, an ``r × r``
eigendecomposition, :func:`cgfac.curvature.kron.factor_eig`), no ``d × d`` matrix kept. Either way a
damped power is, for any ``p`` (``λ = damping · tr(F)/d``, relative: unit-free)::

    (F + λI)^p = λ^p (I − QQᵀ) + Q diag((s + λ)^p) Qᵀ          (exact: QQᵀ = I where F has full rank)

The direction ``O`` of the Nesterov momentum ``M = (1 − μ) g + μ m``, ``m ← μ m + (1 − μ) g`` (``sides="input"``:
``P_G = I``; ``"both"``: both factors)::

    "ortho"   O = msgn(P_G M P_A),  P = (F + λI)^p           Newton–Schulz, as torch.optim.Muon
              scaled by 0.2·√max(d_out, d_in) (AdamW's update RMS; Moonlight)
    "spectral"  O = B_G^{-1/2} msgn(B_G^{-1/2} M B_A^{-1/2}) B_A^{-1/2},  B = F + λI,  rescaled to RMS 0.2:
              steepest descent under the norm ‖B_G^{1/2} O B_A^{1/2}‖_op (Muon's argument with K-FAC's
              metric). With B = L Lᵀ (Cholesky), O = L_G^{-T} msgn(L_G^{-1} M L_A^{-T}) L_A^{-1} exactly
              (Newton–Schulz commutes with orthogonal factors), so no eigendecomposition and no matrix
              root: a refresh is one Cholesky factorisation per side, a step two triangular solves.
    "power"   O = P_G M P_A, rescaled to RMS 0.2              fractional powers, p = −1/2 or −1/4
    "ekfac"   O = Q_G [ (Q_Gᵀ m̂ Q_A) / (√v̂ + ε) ] Q_Aᵀ,     Adam in K-FAC's eigenbasis (EKFAC / SOAP)
              v ← β₂ v + (1 − β₂) (Q_Gᵀ g Q_A)²,  m ← β₁ m + (1 − β₁) g, bias-corrected
    "ekfac-ortho"  O = msgn(EKFAC's O), scaled as "ortho"     (SOAP-Muon with K-FAC's factors)

and the update is ``W ← W (1 − lr·wd) − lr·O``. ``power = 0`` with ``"ortho"`` is Muon
(``adjust_lr_fn="match_rms_adamw"``). Newton-Muon (arXiv 2604.01472) is ``"ortho"``, ``sides="input"``,
``power=-1``.

Failure behaviour: a non-finite gradient skips the whole step (no parameter or state changes,
``skipped_steps`` counts it, a warning says so); a factor whose eigendecomposition fails keeps its
previous powers (the identity before the first), counted in ``factor_failures``.
Processes: under DDP the factors' statistics are averaged over the process group before use, so
every rank takes the same step. Under FSDP2 (``DTensor`` parameters) each hidden matrix's gradient is
gathered whole, every rank computes the same direction and writes its own shard (the hidden
matrices' momentum and powers are whole on every rank; AdamW's state is sharded); the non-finite
check is agreed over the ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cgfac import dtensor
from cgfac.curvature.kron import eigh, factor_eig
from cgfac.layers.experts import ExpertsGroup, experts_helper, product_hooks
from cgfac.options import Direction, FactorSource, Sides, values

DIRECTIONS = values(Direction)
SIDES = values(Sides)
FACTORS = values(FactorSource)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic (Keller Jordan)
UPDATE_RMS = 0.2  # AdamW's typical update RMS (Moonlight's matching constant)

__all__ = ["DIRECTIONS", "TransformerKFAC", "damped_cholesky", "damped_power", "expert_layers", "factor_from_cholesky",
           "factor_from_power", "hidden_matrices", "newton_schulz", "power_matrix"]


def _is_matrix_layer(module: nn.Module) -> bool:
    """``nn.Linear`` or a Hugging Face ``Conv1D`` (``x @ W + b``, ``W``: ``d_in × d_out``), by class name
    so that transformers need not be imported."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and (
        isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")


def hidden_matrices(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[nn.Parameter]]:
    """``(hidden, rest)``: the hidden matrix layers as ``(name, module)`` and every other trainable parameter.

    Hidden: ``nn.Linear`` and ``Conv1D`` modules whose weight is trainable, not an embedding's (a head
    tied to the token embedding is the embedding's) and not the output layer's, the last module of the
    model holding a 2-D weight (Muon's routing). Rest: every other trainable parameter, each once.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    holders = [m for m in model.modules() if isinstance(w := getattr(m, "weight", None), nn.Parameter)
               and w.dim() == 2]
    head = id(holders[-1].weight) if holders else None
    hidden: list[tuple[str, nn.Module]] = []
    taken: set[int] = set()
    for name, module in model.named_modules():
        if not _is_matrix_layer(module):
            continue
        w = module.weight
        if w.requires_grad and id(w) not in embedded and id(w) != head and id(w) not in taken:
            hidden.append((name, module))
            taken.add(id(w))
    rest: list[nn.Parameter] = []
    for p in model.parameters():  # parameters() yields each shared tensor once
        if p.requires_grad and id(p) not in taken:
            rest.append(p)
    return hidden, rest


def expert_layers(model: nn.Module) -> list[tuple[str, ExpertsGroup]]:
    """The mixture-of-experts modules (3-D expert parameters, :func:`cgfac.layers.experts_helper`'s
    probe), each as ``(name, group)``: their experts take the Kronecker direction one by one."""
    out = []
    for name, module in model.named_modules():
        if any(p.dim() == 3 and p.requires_grad for p in module.parameters(recurse=False)):
            found = experts_helper(name, module)
            if isinstance(found, ExpertsGroup):
                out.append((name, found))
    return out


def newton_schulz(m: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``msgn(m) ≈ U Vᵀ`` (``m = U S Vᵀ``) by the quintic Newton–Schulz iteration of torch.optim.Muon.

    ``X ← a X + (b XXᵀ + c (XXᵀ)²) X`` from ``X = m / ‖m‖_F`` on the wide orientation, in ``dtype``.
    The coefficients trade convergence for speed: the singular values land in about [0.7, 1.2] after
    5 steps (not 1), which Muon's authors found does not hurt training; the result is ``m``'s dtype.
    """
    a, b, c = NS_COEFFICIENTS
    x = m.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp_min(eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(m.dtype)


def damped_power(s: Tensor, q: Tensor, damping: float, dim: int, power: float) -> tuple[Tensor, Tensor, float]:
    """``(q, coeff, base)`` with ``(F + λI)^p v = base·v + q diag(coeff) qᵀ v`` for ``F = q diag(s) qᵀ``.

    ``λ = damping · Σs / dim`` (relative to the mean eigenvalue; ``Σs = tr F``), ``base = λ^p``,
    ``coeff = (s + λ)^p − λ^p``. ``q`` (``dim × k``) may hold fewer than ``dim`` columns (the rows'
    span): the formula is exact for the rank-``k`` ``F``.
    """
    lam = damping * float(s.sum()) / dim
    if not lam > 0:
        lam = damping
    base = lam**power
    return q, (s + lam).pow(power) - base, base


class _Side:
    """One factor's damped power: dense ``P`` (``d × d``, nothing else kept) or low-rank ``(q, coeff, base)``;
    or (``"spectral"``) the Cholesky factor ``L`` of ``B = F + λI``, lower triangular."""

    __slots__ = ("base", "chol", "coeff", "dense", "q")

    def __init__(self, q: Tensor | None, coeff: Tensor | None, base: float, dense: Tensor | None,
                 chol: Tensor | None = None) -> None:
        self.q, self.coeff, self.base, self.dense, self.chol = q, coeff, base, dense, chol

    @classmethod
    def power(cls, q: Tensor, coeff: Tensor, base: float) -> _Side:
        """The dense ``P = q diag(coeff + base) qᵀ`` (``q`` square)."""
        return cls(None, None, base, (q * (coeff + base)) @ q.T)

    @classmethod
    def lowrank(cls, q: Tensor, coeff: Tensor, base: float) -> _Side:
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
    lam = damping * float(factor.diagonal().sum()) / factor.shape[0]
    shifted = factor.clone()
    shifted.diagonal().add_(lam if lam > 0 else damping)
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
    side = _Side.power(*damped_power(s, q, damping, factor.shape[0], power))
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


class _Capture:
    """Rows ``a`` (inputs) and ``g`` (output gradients) of one hidden layer, sampled per forward."""

    def __init__(self, module: nn.Module, transposed: bool, expert: bool = False) -> None:
        self.module, self.transposed, self.expert = module, transposed, expert
        self.a: list[Tensor] = []
        self.g: list[Tensor] = []

    def clear(self) -> None:
        self.a.clear()
        self.g.clear()


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:  # the step takes only parameters with a gradient
        raise RuntimeError("a parameter of the update lost its .grad")
    return p.grad


def _check_unit(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return float(value)


class TransformerKFAC(torch.optim.Optimizer):
    """K-FAC's Kronecker factors on a transformer's hidden matrices, AdamW on the rest (module docstring).

    Built from the model in one line, ``TransformerKFAC(model, lr=3e-3, weight_decay=0.1)``; a
    ``torch.optim.Optimizer`` (param groups, ``state_dict``, closures, ``lr`` schedulers), so it
    goes into Hugging Face ``Trainer(optimizers=(opt, sched))`` and Lightning as it is.

    Args:
        model: the model (or its DDP wrapper); hooks on its hidden layers record factor rows.
        lr: learning rate of both parts (AdamW-like; the hidden update has AdamW's RMS).
        weight_decay: decoupled weight decay of the hidden matrices and the other ≥ 2-D parameters.
        direction: "ortho", "spectral", "power", "ekfac" or "ekfac-ortho" (module docstring).
        sides: "input" (``P_G = I``) or "both".
        power: the factors' power ``p`` (``"ortho"``: −1 is Newton-Muon, 0 is Muon; ``"power"``: −1/2,
            −1/4); unused by "ekfac" and "spectral" (whose whitening is fixed).
        damping: λ relative to each factor's mean eigenvalue (> 0).
        factors: "ema" (running factors, eigendecomposed every ``eig_every`` steps) or "rows" (this
            step's rows, low-rank; not with "ekfac").
        rows: positions sampled per layer and step for the factors (None: all).
        momentum: μ of the hidden matrices' (Nesterov) momentum; ``"ekfac"`` uses ``betas`` instead.
        betas: AdamW's (and ``"ekfac"``'s) β₁ and β₂.
        eps: AdamW's (and ``"ekfac"``'s) ε.
        factor_decay: β_f of the running factors.
        factor_every: the running factors' refresh period (steps); rows are captured on those steps only.
        eig_every: the period (steps) of the factors' eigendecompositions.
        ns_steps: Newton–Schulz iterations of ``"ortho"``.
        ns_dtype: the Newton–Schulz iterations' dtype (default: bfloat16, as torch.optim.Muon, on CUDA;
            float32 elsewhere: a CPU without bfloat16 matrix units emulates it, and torch.optim.Muon's
            step cost 16x AdamW's on the 2-core AMD EPYC of the benchmarks).
        adamw_lr: the rest's learning rate, if it should differ from ``lr`` (a scheduler scales both).
        seed: seeds the sampling of rows.
        process_group: the ``torch.distributed`` group whose ranks share the factors (default: the world,
            when initialised): their statistics are averaged (``"ema"``) or their rows gathered (``"rows"``).
    """

    def __init__(self, model: nn.Module, *, lr: float = 3e-3, weight_decay: float = 0.1,
                 direction: Direction = "ortho", sides: Sides = "input", power: float = -0.5,
                 damping: float = 0.03, factors: FactorSource = "ema", rows: int | None = None,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 factor_decay: float = 0.95, factor_every: int = 1, eig_every: int = 10, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None, adamw_lr: float | None = None, seed: int = 0,
                 process_group: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value, allowed in (("direction", direction, DIRECTIONS), ("sides", sides, SIDES),
                                     ("factors", factors, FACTORS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if direction.startswith("ekfac") and factors == "rows":
            raise ValueError(f"direction={direction!r} needs factors='ema' (a full eigenbasis); got factors='rows'")
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        if adamw_lr is not None and (not isinstance(adamw_lr, (int, float)) or adamw_lr < 0):
            raise ValueError(f"adamw_lr must be a non-negative number or None, got {adamw_lr!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        if not isinstance(damping, (int, float)) or not damping > 0:
            raise ValueError(f"damping must be a positive number, got {damping!r}")
        if not isinstance(power, (int, float)) or not -1.0 <= power <= 0.0:
            raise ValueError(f"power must be in [-1, 0], got {power!r}")
        _check_unit("momentum", momentum)
        _check_unit("factor_decay", factor_decay)
        if not (isinstance(betas, tuple) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        _check_unit("betas[0]", betas[0])
        _check_unit("betas[1]", betas[1])
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        for count_name, count in (("factor_every", factor_every), ("eig_every", eig_every), ("ns_steps", ns_steps)):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{count_name} must be a positive int, got {count!r}")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"rows must be a positive int or None, got {rows!r}")
        hidden, rest = hidden_matrices(model)
        experts = expert_layers(model)
        expert_params = {id(p): (group, pname) for _, group in experts for pname, p in group.params.items()}
        rest = [p for p in rest if id(p) not in expert_params]
        self.direction, self.sides, self.factors = direction, sides, factors
        self.power, self.damping, self.rows = float(power), float(damping), rows
        self.factor_decay, self.factor_every, self.eig_every = float(factor_decay), factor_every, eig_every
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        # the running factor is not kept where it is refreshed and decomposed on the same steps (_refresh)
        self.compact = factors == "ema" and not direction.startswith("ekfac") and factor_every == eig_every
        # power 0 with "ortho"/"power": P = I, no factors (with "ortho": Muon itself)
        self.needs_factors = direction.startswith("ekfac") or direction == "spectral" or power != 0.0
        self.process_group = process_group
        self.skipped_steps = 0
        self.factor_failures = 0
        kron_ids = {id(m.weight) for _, m in hidden}
        #: every trainable parameter's route, by name: "kron" (the Kronecker direction), "kron-experts"
        #: (a 3-D expert parameter: the direction per expert) or "adamw"
        self.routes = {name: "kron" if id(p) in kron_ids else "kron-experts" if id(p) in expert_params else "adamw"
                       for name, p in model.named_parameters() if p.requires_grad}
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        rest_lr = lr if adamw_lr is None else adamw_lr
        expert_tensors = [p for _, group in experts for p in group.params.values()]
        groups: list[dict[str, Any]] = [{"params": [m.weight for _, m in hidden], "kind": "kron"},
                                        {"params": expert_tensors, "kind": "experts"},
                                        {"params": decay, "kind": "adamw", "lr": rest_lr},
                                        {"params": no_decay, "kind": "adamw", "lr": rest_lr, "weight_decay": 0.0}]
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "betas": betas, "eps": eps}
        super().__init__([g for g in groups if g["params"]], defaults)
        self._captures = {m.weight: _Capture(m, type(m).__name__ == "Conv1D") for _, m in hidden}
        self._generator = torch.Generator().manual_seed(seed)
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._hook) for _, m in hidden
                                                if self.needs_factors]
        self._by_module = {m: self._captures[m.weight] for _, m in hidden}
        # per 3-D expert parameter, one capture per expert (rows: the expert's routed tokens)
        self._expert_captures: dict[Tensor, list[_Capture]] = {
            p: [_Capture(group.module, group.transposed[pname], expert=True) for _ in range(p.shape[0])]
            for _, group in experts for pname, p in group.params.items()}
        if self.needs_factors:
            for _, group in experts:
                self._handles += self._attach_experts(group)
        self._steps_taken = 0

    # --- capture ----------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Record this forward's sampled input rows and, through a hook on the output, its gradient rows."""
        due = self.factors == "rows" or self._steps_taken % self.factor_every == 0  # rows only where used
        if not (due and module.training and torch.is_grad_enabled()):
            return
        if not (isinstance(output, Tensor) and output.requires_grad and args and isinstance(args[0], Tensor)):
            return
        cap = self._by_module[module]
        a = args[0].detach().reshape(-1, args[0].shape[-1])
        idx = None
        if self.rows is not None and self.rows < a.shape[0]:
            idx = torch.randperm(a.shape[0], generator=self._generator)[: self.rows].to(a.device)
            a = a[idx]
        cap.a.append(a)

        def grad_rows(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])
            cap.g.append(g[idx] if idx is not None else g)

        output.register_hook(grad_rows)

    def _attach_experts(self, group: ExpertsGroup) -> list[RemovableHandle]:
        """Hooks recording each expert's sampled routed rows (:mod:`cgfac.layers.experts`' products)."""
        def start(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            due = self._steps_taken % self.factor_every == 0
            if not (due and module.training and torch.is_grad_enabled()):
                return None

            def found(pname: str, segments: list[tuple[int, int, int]], transposed: bool, x: Tensor,
                      out: Tensor) -> None:
                caps = self._expert_captures[group.params[pname]]
                if not out.requires_grad or transposed != caps[0].transposed:
                    return
                rows_x = x.detach().reshape(-1, x.shape[-1])
                picks: list[tuple[_Capture, Tensor]] = []
                for e, lo, hi in segments:
                    idx = torch.arange(lo, hi, device=x.device)
                    if self.rows is not None and self.rows < hi - lo:
                        idx = idx[torch.randperm(hi - lo, generator=self._generator)[: self.rows].to(x.device)]
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
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- factors ----------------------------------------------------------------------------------
    @staticmethod
    def _rows(parts: list[Tensor]) -> Tensor:
        """The captured rows as one matrix, in at least float32."""
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return x.float() if x.element_size() < 4 else x

    def _world(self) -> int:
        """Processes sharing the factors (1 without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _mean_outer(self, parts: list[Tensor]) -> Tensor:
        """``F̂ = XᵀX / n`` of this step's rows ``X``, averaged over the processes."""
        x = self._rows(parts)
        f = x.T @ x / x.shape[0]
        if self._world() > 1:
            dist.all_reduce(f, op=dist.ReduceOp.AVG, group=self.process_group)
        return f

    def _expert_outer(self, cap: _Capture, sides: tuple[str, ...], state: dict[str, Any]) -> dict[str, Tensor] | None:
        """An expert's ``F̂ = Σ XᵀX / Σ n`` over the processes' routed rows on a refresh step (every
        rank joins the reduction, with or without rows), or None where no process had rows."""
        if self._steps_taken % self.factor_every != 0:
            return None
        dims, like = {"a": state["dims"][1], "g": state["dims"][0]}, state["like"]
        have = all(getattr(cap, s) for s in sides)
        sums = {s: (lambda x: (x.T @ x).to(like.dtype))(self._rows(getattr(cap, s))) if have else
                like.new_zeros(dims[s], dims[s]) for s in sides}
        count = like.new_tensor([float(sum(t.shape[0] for t in cap.a)) if have else 0.0])
        if self._world() > 1:
            for t in [*sums.values(), count]:
                dist.all_reduce(t, group=self.process_group)
        total = float(count)
        return {s: f / total for s, f in sums.items()} if total > 0 else None

    def _gathered_rows(self, parts: list[Tensor]) -> Tensor:
        """Every process's rows ``X`` (equal counts per rank), scaled by ``1/√n`` so ``F̂ = XᵀX``."""
        x = self._rows(parts)
        if (world := self._world()) > 1:
            chunks = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(chunks, x.contiguous(), group=self.process_group)
            x = torch.cat(chunks)
        return x / math.sqrt(x.shape[0])

    def _eig(self, f: Tensor) -> tuple[Tensor, Tensor] | None:
        """``F = Q diag(s) Qᵀ`` (``s ≥ 0``; retried in float64 once), or None where it fails."""
        try:
            return eigh(f)
        except (torch.linalg.LinAlgError, RuntimeError):
            return None

    def _refresh(self, cap: _Capture, state: dict[str, Any]) -> None:
        """This step's factor statistics into the layer's state, and its damped powers where due.

        Kept per side: ``"ekfac"``: the running factor and its eigensystem ``eig_*``; ``"ortho"`` and
        ``"power"``: the running factor and the dense power ``power_*``, or the power alone where the
        factor is refreshed and decomposed on the same steps (``factor_every == eig_every``: the
        running factor is recovered from the power when the next rows arrive,
        :func:`factor_from_power`), one ``d × d`` matrix per side."""
        sides = ("a", "g") if self.sides == "both" else ("a",)
        have = all(getattr(cap, s) for s in sides)
        if self.factors == "rows":
            if not have:
                return
            for s in sides:
                rows = self._gathered_rows(getattr(cap, s))
                ev, q = factor_eig(rows)
                p = -0.5 if self.direction == "spectral" else self.power
                state[f"side_{s}"] = _Side.lowrank(*damped_power(ev, q, self.damping, rows.shape[1], p))
            return
        fresh: dict[str, Tensor] = {}
        batch = self._expert_outer(cap, sides, state) if cap.expert else (
            {s: self._mean_outer(getattr(cap, s)) for s in sides} if have else None)
        if batch is not None:  # captured on refresh steps only (the hook)
            for s in sides:
                f = batch[s]
                old = state.get(f"factor_{s}")
                if old is None and self.compact and f"power_{s}" in state:
                    old = factor_from_power(state[f"power_{s}"], self.damping, self.power)
                if old is None and self.compact and f"chol_{s}" in state:
                    old = factor_from_cholesky(state[f"chol_{s}"], self.damping)
                fresh[s] = f if old is None else old.lerp_(f, 1 - self.factor_decay)
                if not self.compact:
                    state[f"factor_{s}"] = fresh[s]
        for s in sides:
            factor: Tensor | None = fresh.get(s) if self.compact else state.get(f"factor_{s}")
            decomposed = any(f"{k}_{s}" in state for k in ("eig", "power", "chol"))
            if factor is None or (not self.compact and state["step"] % self.eig_every != 0 and decomposed):
                continue
            if self.direction.startswith("ekfac"):
                eig = self._eig(factor)
                if eig is None:
                    self.factor_failures += 1
                else:
                    state[f"eig_{s}"] = eig
                continue
            try:
                if self.direction == "spectral":
                    low = damped_cholesky(factor, self.damping)
                    state[f"chol_{s}"] = low
                    state[f"side_{s}"] = _Side(None, None, 0.0, None, low)
                    continue
                dense = power_matrix(factor, self.damping, self.power)
            except (torch.linalg.LinAlgError, RuntimeError):
                self.factor_failures += 1
                continue
            state[f"power_{s}"] = dense
            state[f"side_{s}"] = _Side(None, None, 0.0, dense)

    # --- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(dtensor.local(p.grad)).all() for p in params]).all() if params \
            else torch.ones((), dtype=torch.bool)
        if any(dtensor.is_sharded(p) for p in params) and self._world() > 1:  # FSDP2: each rank sees its shards
            flag = finite.to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
            finite = flag[0] > 0
        if not bool(finite):
            self.skipped_steps += 1
            warnings.warn("TransformerKFAC: a non-finite gradient; the step is skipped", RuntimeWarning, stacklevel=2)
            for cap in self._all_captures():
                cap.clear()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["kind"] == "kron":
                    self._kron_update(p, group)
                elif group["kind"] == "experts":
                    self._experts_update(p, group)
                else:
                    self._adamw_update(p, group)
        for cap in self._all_captures():
            cap.clear()
        self._steps_taken += 1
        return loss

    def _adamw_update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, t = group["lr"], state["step"]
        grad = _grad(p)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

    def _all_captures(self) -> list[_Capture]:
        return [*self._captures.values(), *(c for caps in self._expert_captures.values() for c in caps)]

    def _kron_update(self, p: Tensor, group: dict[str, Any]) -> None:
        cap = self._captures[p]
        grad = dtensor.full(_grad(p))  # FSDP2: the whole gradient (an all-gather); every rank takes the step
        grad = grad.T if cap.transposed else grad  # d_out × d_in
        update = self._direction(grad, cap, self.state[p], group)
        dtensor.local(p).mul_(1 - group["lr"] * group["weight_decay"])
        dtensor.add_full(p, update.T if cap.transposed else update, alpha=-group["lr"])

    def _experts_update(self, p: Tensor, group: dict[str, Any]) -> None:
        """Each expert's slice ``p[e]`` as its own hidden matrix (its own factors and momentum)."""
        caps = self._expert_captures[p]
        state = self.state[p]
        if "experts" not in state:
            state["experts"] = [{} for _ in caps]
        grad = _grad(p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        for e, (cap, sub) in enumerate(zip(caps, state["experts"])):
            g = grad[e].T if cap.transposed else grad[e]
            if "dims" not in sub:
                sub["dims"] = tuple(g.shape)
            sub["like"] = g.new_empty(0, dtype=torch.promote_types(g.dtype, torch.float32))  # not saved
            update = self._direction(g, cap, sub, group)
            p[e].add_(update.T if cap.transposed else update, alpha=-group["lr"])

    def _direction(self, grad: Tensor, cap: _Capture, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """One hidden matrix's update ``O`` (``d_out × d_in``) from its gradient, rows and state."""
        if "step" not in state:
            state["step"] = 0
        if self.needs_factors:
            self._refresh(cap, state)
        state["step"] += 1
        if self.direction.startswith("ekfac"):
            update = self._ekfac(grad, state, group)
            if self.direction == "ekfac-ortho":
                update = self._orthogonalised(update)
            return update
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(grad)
        buf.lerp_(grad, 1 - group["momentum"])  # torch.optim.Muon's convention (a scale NS ignores)
        if self.direction == "spectral":
            return self._spectral(grad.lerp(buf, group["momentum"]), state)
        m = self._precondition(grad.lerp(buf, group["momentum"]), state)
        if self.direction == "ortho":
            return self._orthogonalised(m)
        return m * (UPDATE_RMS * math.sqrt(m.numel()) / m.norm().clamp_min(1e-30))

    def _orthogonalised(self, m: Tensor) -> Tensor:
        """``msgn(m)`` by Newton–Schulz, scaled to AdamW's update RMS: ``0.2·√max(d_out, d_in)``."""
        dtype = self.ns_dtype or (torch.bfloat16 if m.is_cuda else torch.float32)
        return newton_schulz(m, self.ns_steps, dtype=dtype).mul_(UPDATE_RMS * math.sqrt(max(m.shape)))

    def _spectral(self, m: Tensor, state: dict[str, Any]) -> Tensor:
        """``O = X_G msgn(X_Gᵀ M X_A) X_Aᵀ`` (``X Xᵀ = B⁻¹``), rescaled to RMS 0.2; a side
        without factors yet is the identity."""
        side_a = state.get("side_a")
        side_g = state.get("side_g") if self.sides == "both" else None
        if side_a is not None:
            m = side_a.whiten_right(m)
        if side_g is not None:
            m = side_g.whiten_left(m)
        dtype = self.ns_dtype or (torch.bfloat16 if m.is_cuda else torch.float32)
        o = newton_schulz(m, self.ns_steps, dtype=dtype)
        if side_a is not None:
            o = side_a.unwhiten_right(o)
        if side_g is not None:
            o = side_g.unwhiten_left(o)
        return o.mul_(UPDATE_RMS * math.sqrt(o.numel()) / o.norm().clamp_min(1e-30))

    def _precondition(self, m: Tensor, state: dict[str, Any]) -> Tensor:
        side_a, side_g = state.get("side_a"), state.get("side_g")
        if side_a is not None:
            m = side_a.right(m)
        if side_g is not None and self.sides == "both":
            m = side_g.left(m)
        return m

    def _ekfac(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """Adam in the factors' eigenbasis (identity on a side without factors yet)."""
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            state["adam_step"] = 0
        q_a = state["eig_a"][1] if "eig_a" in state else None
        q_g = state["eig_g"][1] if "eig_g" in state and self.sides == "both" else None

        def rotate(x: Tensor) -> Tensor:
            x = x @ q_a if q_a is not None else x
            return q_g.T @ x if q_g is not None else x

        state["adam_step"] += 1
        t = state["adam_step"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        g_rot = rotate(grad)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        u = rotate(state["exp_avg"]).div_(denom).div_(1 - beta1**t)
        u = u @ q_a.T if q_a is not None else u
        return q_g @ u if q_g is not None else u

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's, without the ``side_*`` wrappers (rebuilt from ``power_*`` on load; with
        ``factors="rows"`` from the next step's rows)."""
        sd = super().state_dict()

        def plain(st: dict[str, Any]) -> dict[str, Any]:
            out = {n: v for n, v in st.items() if not n.startswith("side_") and n != "like"}
            if "experts" in out:
                out["experts"] = [plain(sub) for sub in out["experts"]]
            return out

        sd["state"] = {k: plain(s) for k, s in sd["state"].items()}
        sd["transformer_kfac"] = {"skipped_steps": self.skipped_steps, "factor_failures": self.factor_failures,
                                  "step_count": self._steps_taken, "generator": self._generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("transformer_kfac", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "transformer_kfac"})
        self.skipped_steps = extra.get("skipped_steps", 0)
        self.factor_failures = extra.get("factor_failures", 0)
        self._steps_taken = extra.get("step_count", 0)
        if "generator" in extra:
            self._generator.set_state(extra["generator"])
        for state in self.state.values():  # the sides wrap the saved powers
            for sub in state.get("experts", [state]):
                if "dims" in sub:
                    sub["dims"] = tuple(sub["dims"])
                for s in ("a", "g"):
                    if f"power_{s}" in sub:
                        sub[f"side_{s}"] = _Side(None, None, 0.0, sub[f"power_{s}"])
                    if f"chol_{s}" in sub:
                        sub[f"side_{s}"] = _Side(None, None, 0.0, None, sub[f"chol_{s}"])

