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

``rank=k`` (with ``"ema"``): a side wider than ``k`` keeps its running factor as ``F = Q diag(s) Qᵀ +
τ (I − QQᵀ)`` (``Q``: ``d × k``; ``τ`` the rest of the trace over ``d − k``), updated on each refresh
exactly from the rows ``X`` through the same low-rank eigensystem (``β F + (1 − β) XᵀX − βτ I`` has
rank ``≤ k + n``: :func:`~cgfac.optim.transformer_factors.lowrank_running_factor`) and truncated to its top
``k`` eigenpairs; then ``(F + λI)^p = (τ + λ)^p (I − QQᵀ) + Q diag((s + λ)^p) Qᵀ``. No ``d × d``
matrix or eigendecomposition: a refresh costs ``O(d (k + n)²)``, a step ``2 k d`` per row of ``M``.

The direction ``O`` of the Nesterov momentum ``M = (1 − μ) g + μ m``, ``m ← μ m + (1 − μ) g`` (``sides="input"``:
``P_G = I``; ``"both"``: both factors; ``"smaller"``: the smaller dimension's factor, the other ``I``)::

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

from cgfac import dtensor
from cgfac.config import Direction, FactorSource, Sides, values
from cgfac.layers.experts import ExpertsGroup, experts_helper
from cgfac.optim.transformer_factors import (
    FactorRefresh,
    FactorSettings,
    LayerRows,
    RowRecorder,
    damped_cholesky,
    damped_power,
    factor_from_cholesky,
    factor_from_power,
    power_matrix,
)

DIRECTIONS = values(Direction)
SIDES = values(Sides)
FACTORS = values(FactorSource)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic (Keller Jordan)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, degree 5, lower bound 1e-3): one
# quintic per iteration, each minimax-optimal on the interval the previous ones leave, so the first k are
# the best k-step schedule; every one but the last divided by the paper's safety factor 1.01 (a, b/1.01³,
# c/1.01⁵), and iterations past the eighth repeat the last.
_POLAR_EXPRESS = ((8.28721201814563, -23.595886519098837, 17.300387312530933),
                  (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
                  (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
                  (3.3184196573706015, -2.488488024314874, 0.51004894012372),
                  (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
                  (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
                  (1.8750014808534479, -1.2500016453999487, 0.3750001645474248))
POLAR_EXPRESS_COEFFICIENTS = (*((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS),
                              (1.875, -1.25, 0.375))
NS_SCHEDULES = ("jordan", "polar-express")
NS_FORMS = ("auto", "plain", "gram")
UPDATE_RMS = 0.2  # AdamW's typical update RMS (Moonlight's matching constant)

__all__ = ["DIRECTIONS", "NS_FORMS", "NS_SCHEDULES", "POLAR_EXPRESS_COEFFICIENTS", "TransformerKFAC", "damped_cholesky",
           "damped_power", "expert_layers", "factor_from_cholesky", "factor_from_power", "gram_form_cheaper",
           "hidden_matrices", "newton_schulz", "ns_coefficients", "power_matrix"]


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


def ns_coefficients(schedule: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` Newton–Schulz iterations: ``"jordan"``, torch.optim.Muon's
    one quintic every time; ``"polar-express"``, :data:`POLAR_EXPRESS_COEFFICIENTS` in turn."""
    if schedule == "jordan":
        return [NS_COEFFICIENTS] * steps
    if schedule == "polar-express":
        table = POLAR_EXPRESS_COEFFICIENTS
        return [table[min(i, len(table) - 1)] for i in range(steps)]
    raise ValueError(f"ns_schedule must be one of {NS_SCHEDULES}, got {schedule!r}")


def gram_form_cheaper(rows: int, cols: int, steps: int, dtype: torch.dtype) -> bool:
    """Whether :func:`newton_schulz`'s Gram form costs fewer flops on a ``rows × cols`` matrix
    (``m = min``, ``n = max``): ``2m²n + (4k − 3)m³`` against the plain form's ``k (2m²n + m³)``
    multiply-adds for ``k`` steps; in float32 and float64 only (a Gram matrix in bfloat16 loses the
    singular values below ``√ε·σ_max ≈ 0.06·σ_max``)."""
    m, n = min(rows, cols), max(rows, cols)
    return dtype in (torch.float32, torch.float64) and 2 * m * m * n + (4 * steps - 3) * m**3 < steps * (
        2 * m * m * n + m**3)


def newton_schulz(m: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
                  schedule: str = "jordan", form: str = "auto") -> Tensor:
    """``msgn(m) ≈ U Vᵀ`` (``m = U S Vᵀ``) by quintic Newton–Schulz iterations.

    ``X ← P X``, ``P = a I + b XXᵀ + c (XXᵀ)²``, on the wide orientation (``X``: ``m × n``, ``m ≤ n``)
    in ``dtype``: each singular value ``σ ← a σ + b σ³ + c σ⁵``. ``schedule="jordan"`` (torch.optim.Muon's):
    from ``X = m / ‖m‖_F``, one quintic that trades convergence for speed: the singular values land in
    about [0.7, 1.2] after 5 steps (not 1), which Muon's authors found does not hurt training.
    ``"polar-express"``: from ``X = m / (1.01 ‖m‖_F)``, the Polar Express schedule (:func:`ns_coefficients`):
    the singular values in ``[10⁻³, 1]·‖m‖_F`` land in [0.84, 1.12] after 5 steps and [0.993, 1.001]
    after 6 (Jordan's: [0.47, 1.20] and [0.68, 1.20]; after 4, [0.42, 1.56] against [0.14, 1.20]).

    ``form="plain"`` updates ``X`` (per step ``2m²n + m³``); ``"gram"`` iterates on the ``m × m``
    Gram matrix alone (every ``P`` is a polynomial in ``R₀ = X₀X₀ᵀ``, so they commute):
    ``R ← P R P``, ``Q ← P Q``, and ``X = Q X₀`` once at the end (``2m²n + (4k − 3)m³`` in all; the
    same result in exact arithmetic); ``"auto"`` takes the cheaper (:func:`gram_form_cheaper`), the
    Gram form for a matrix about twice as wide as tall or more. The result is ``m``'s dtype.
    """
    if form not in NS_FORMS:
        raise ValueError(f"ns_form must be one of {NS_FORMS}, got {form!r}")
    coefficients = ns_coefficients(schedule, steps)
    x = m.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() * (1.01 if schedule == "polar-express" else 1.0)).clamp_min(eps)
    if form == "gram" or (form == "auto" and gram_form_cheaper(x.shape[0], x.shape[1], steps, dtype)):
        r, q = x @ x.T, None
        for i, (a, b, c) in enumerate(coefficients):
            p = torch.addmm(r, r, r, beta=b, alpha=c)
            p.diagonal().add_(a)
            q = p if q is None else p @ q
            if i + 1 < len(coefficients):
                r = p @ r @ p
        if q is not None:
            x = q @ x
    else:
        for a, b, c in coefficients:
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(m.dtype)


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


def adamw_update(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One AdamW step of ``p`` (bias-corrected moments in ``state``; ``group``'s lr, betas, eps, weight decay)."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    lr, t = group["lr"], state["step"]
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
    p.mul_(1 - lr * group["weight_decay"])
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def _check_arguments(*, direction: str, sides: str, factors: str, lr: float, adamw_lr: float | None,
                     weight_decay: float, damping: float, power: float, momentum: float, factor_decay: float,
                     betas: tuple[float, float], eps: float, factor_every: int, eig_every: int, ns_steps: int,
                     rows: int | None, rank: int | None) -> None:
    """:class:`TransformerKFAC`'s arguments: ``ValueError``/``TypeError`` naming the first bad one."""
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
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if rank is not None and (direction not in ("ortho", "power") or factors != "ema"):
        raise ValueError(f"rank needs direction 'ortho' or 'power' with factors='ema'; got direction={direction!r}, "
                         f"factors={factors!r}")


class _Setting:
    """A :class:`TransformerKFAC` attribute that reads and writes its shared :class:`FactorSettings`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.settings, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.settings, self.name, value)


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
        sides: "input" (``P_G = I``), "both", or "smaller" (per layer the factor of the smaller
            dimension: ``P_A`` where ``d_in ≤ d_out``, else ``P_G``; an MLP's down-projection, ``d_in = 4d``,
            takes its ``d × d`` output factor instead of the ``4d × 4d`` input one).
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
        ns_schedule: their coefficients (:func:`newton_schulz`): "jordan" (torch.optim.Muon's quintic)
            or "polar-express" (Polar Express, one quintic per iteration; closer to the polar factor).
        ns_form: how they are computed (:func:`newton_schulz`): "auto" (the Gram form where it costs
            fewer flops, in float32 and float64), "plain" (torch.optim.Muon's) or "gram".
        ns_dtype: the Newton–Schulz iterations' dtype (default: bfloat16, as torch.optim.Muon, on CUDA;
            float32 elsewhere: a CPU without bfloat16 matrix units emulates it, and torch.optim.Muon's
            step cost 16x AdamW's on the 2-core AMD EPYC of the benchmarks).
        adamw_lr: the rest's learning rate, if it should differ from ``lr`` (a scheduler scales both).
        seed: seeds the sampling of rows.
        process_group: the ``torch.distributed`` group whose ranks share the factors (default: the world,
            when initialised): their statistics are averaged (``"ema"``) or their rows gathered (``"rows"``).
        rank: with ``factors="ema"``, each side wider than ``rank`` keeps its running factor as its top
            ``rank`` eigenpairs and an isotropic rest, updated from the rows without a ``d × d`` matrix or
            eigendecomposition (:func:`~cgfac.optim.transformer_factors.lowrank_running_factor`); its power is
            refreshed with every factor refresh (``eig_every`` does not apply) and costs ``2·rank·d``
            per row of the momentum instead of ``d²``. None: every side dense.
    """

    direction = _Setting()
    sides = _Setting()
    factors = _Setting()
    power = _Setting()
    damping = _Setting()
    rows = _Setting()
    factor_decay = _Setting()
    factor_every = _Setting()
    eig_every = _Setting()
    rank = _Setting()

    def __init__(self, model: nn.Module, *, lr: float = 3e-3, weight_decay: float = 0.1,
                 direction: Direction = "ortho", sides: Sides = "input", power: float = -0.5,
                 damping: float = 0.03, factors: FactorSource = "ema", rows: int | None = None,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 factor_decay: float = 0.95, factor_every: int = 1, eig_every: int = 10, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None, ns_schedule: str = "jordan", ns_form: str = "auto",
                 adamw_lr: float | None = None, seed: int = 0,
                 process_group: Any = None, rank: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_arguments(direction=direction, sides=sides, factors=factors, lr=lr, adamw_lr=adamw_lr,
                         weight_decay=weight_decay, damping=damping, power=power, momentum=momentum,
                         factor_decay=factor_decay, betas=betas, eps=eps, factor_every=factor_every,
                         eig_every=eig_every, ns_steps=ns_steps, rows=rows, rank=rank)
        hidden, rest = hidden_matrices(model)
        experts = expert_layers(model)
        expert_params = {id(p): (group, pname) for _, group in experts for pname, p in group.params.items()}
        rest = [p for p in rest if id(p) not in expert_params]
        #: the factor settings the row hooks and the refresh read (``opt.damping = …`` reaches both)
        self.settings = FactorSettings(direction=direction, sides=sides, factors=factors, power=float(power),
                                       damping=float(damping), rows=rows, factor_decay=float(factor_decay),
                                       factor_every=factor_every, eig_every=eig_every, rank=rank)
        if ns_schedule not in NS_SCHEDULES:
            raise ValueError(f"ns_schedule must be one of {NS_SCHEDULES}, got {ns_schedule!r}")
        if ns_form not in NS_FORMS:
            raise ValueError(f"ns_form must be one of {NS_FORMS}, got {ns_form!r}")
        self.ns_steps, self.ns_dtype, self.ns_schedule, self.ns_form = ns_steps, ns_dtype, ns_schedule, ns_form
        # power 0 with "ortho"/"power": P = I, no factors (with "ortho": Muon itself)
        self.needs_factors = direction.startswith("ekfac") or direction == "spectral" or power != 0.0
        self.process_group = process_group
        self.skipped_steps = 0
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
        #: the rows' hooks (:class:`cgfac.optim.transformer_factors.RowRecorder`) and the factors' refresh
        self.recorder = RowRecorder(hidden, experts, settings=self.settings, seed=seed, active=self.needs_factors)
        self.refresher = FactorRefresh(self.settings, process_group)

    # --- capture ----------------------------------------------------------------------------------
    # --- factors ----------------------------------------------------------------------------------
    @property
    def compact(self) -> bool:
        """Whether each side keeps its power alone (the running factor recovered from it)."""
        return self.settings.compact

    @property
    def factor_failures(self) -> int:
        """Factor decompositions that failed (those layers kept their previous powers)."""
        return self.refresher.factor_failures

    @factor_failures.setter
    def factor_failures(self, value: int) -> None:
        self.refresher.factor_failures = value

    def remove(self) -> None:
        """Remove the capture hooks (the optimizer is then unusable for factor updates)."""
        self.recorder.remove()

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
        if any(dtensor.is_sharded(p) for p in params) and self.refresher.world() > 1:  # FSDP2: each rank its shards
            flag = finite.to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
            finite = flag[0] > 0
        if not bool(finite):
            self.skipped_steps += 1
            warnings.warn("TransformerKFAC: a non-finite gradient; the step is skipped", RuntimeWarning, stacklevel=2)
            self.recorder.clear()
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
                    adamw_update(p, _grad(p), self.state[p], group)
        self.recorder.clear()
        self.recorder.steps_taken += 1
        return loss

    def _kron_update(self, p: Tensor, group: dict[str, Any]) -> None:
        cap = self.recorder.captures[p]
        grad = dtensor.full(_grad(p))  # FSDP2: the whole gradient (an all-gather); every rank takes the step
        grad = grad.T if cap.transposed else grad  # d_out × d_in
        update = self._direction(grad, cap, self.state[p], group)
        dtensor.local(p).mul_(1 - group["lr"] * group["weight_decay"])
        dtensor.add_full(p, update.T if cap.transposed else update, alpha=-group["lr"])

    def _experts_update(self, p: Tensor, group: dict[str, Any]) -> None:
        """Each expert's slice ``p[e]`` as its own hidden matrix (its own factors and momentum)."""
        caps = self.recorder.expert_captures[p]
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

    def _direction(self, grad: Tensor, cap: LayerRows, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """One hidden matrix's update ``O`` (``d_out × d_in``) from its gradient, rows and state."""
        if "step" not in state:
            state["step"] = 0
        if self.needs_factors:
            self.refresher.refresh(cap, state, self.recorder.steps_taken, tuple(grad.shape))
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
        o = newton_schulz(m, self.ns_steps, dtype=dtype, schedule=self.ns_schedule, form=self.ns_form)
        return o.mul_(UPDATE_RMS * math.sqrt(max(m.shape)))

    def _spectral(self, m: Tensor, state: dict[str, Any]) -> Tensor:
        """``O = X_G msgn(X_Gᵀ M X_A) X_Aᵀ`` (``X Xᵀ = B⁻¹``), rescaled to RMS 0.2; a side
        without factors yet is the identity."""
        side_a, side_g = state.get("side_a"), state.get("side_g")
        if side_a is not None:
            m = side_a.whiten_right(m)
        if side_g is not None:
            m = side_g.whiten_left(m)
        dtype = self.ns_dtype or (torch.bfloat16 if m.is_cuda else torch.float32)
        o = newton_schulz(m, self.ns_steps, dtype=dtype, schedule=self.ns_schedule, form=self.ns_form)
        if side_a is not None:
            o = side_a.unwhiten_right(o)
        if side_g is not None:
            o = side_g.unwhiten_left(o)
        return o.mul_(UPDATE_RMS * math.sqrt(o.numel()) / o.norm().clamp_min(1e-30))

    def _precondition(self, m: Tensor, state: dict[str, Any]) -> Tensor:
        side_a, side_g = state.get("side_a"), state.get("side_g")
        if side_a is not None:
            m = side_a.right(m)
        if side_g is not None:
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
        q_g = state["eig_g"][1] if "eig_g" in state else None

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
                                  "step_count": self.recorder.steps_taken,
                                  "generator": self.recorder.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("transformer_kfac", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "transformer_kfac"})
        self.skipped_steps = extra.get("skipped_steps", 0)
        self.factor_failures = extra.get("factor_failures", 0)
        self.recorder.steps_taken = extra.get("step_count", 0)
        if "generator" in extra:
            self.recorder.generator.set_state(extra["generator"])
        for state in self.state.values():  # the sides wrap the saved powers
            for sub in state.get("experts", [state]):
                if "dims" in sub:
                    sub["dims"] = tuple(sub["dims"])
                for s in ("a", "g"):
                    if (side := self.refresher.side_from_state(sub, s)) is not None:
                        sub[f"side_{s}"] = side

