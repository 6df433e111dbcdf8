"""K-FAC and CG-FAC as ``torch.optim`` optimizers that own the update (Martens & Grosse 2015, §6–7).

The preconditioner (:class:`cgfac.KFAC` or :class:`cgfac.CGFAC`) turns the gradient ``∇h`` into the
damped natural-gradient direction ``Δ = −(C̃ + λI)⁻¹ ∇h`` (``C̃``: the Kronecker or per-layer
curvature, ``λ``: the damping). The optimizer then takes the update ::

    δ = lr · α · Δ + μ · δ₀                               (δ₀: the previous update)

where ``(α, μ)`` minimise the quadratic model of the loss on this batch ::

    M(δ) = ∇hᵀδ + ½ δᵀ (C + λI) δ                        (C: the exact GGN, = Fisher for these losses)
    [α, μ]ᵀ = −[[ΔᵀC̄Δ, ΔᵀC̄δ₀], [δ₀ᵀC̄Δ, δ₀ᵀC̄δ₀]]⁻¹ [∇hᵀΔ, ∇hᵀδ₀]ᵀ,   C̄ = C + (λ + wd)I

(``adaptive="lr+momentum"``; ``"lr"`` solves for ``α`` alone with ``μ`` = the group's
``momentum``; ``"none"`` takes ``α = 1``, i.e. SGD with momentum on the preconditioned direction).
The products ``Cv`` are exact: one forward-mode pass (``torch.autograd.forward_ad``) through the
model per vector gives ``Jv`` at the inputs recorded from the closure's forward, and the output
Hessian of the likelihood (``loss_type``) closes the form ``vᵀCw = (1/r) Σ_rows (Jv)ᵀ H (Jw)``:

* ``"cross_entropy"``: logits, ``H = diag(p) − ppᵀ``, ``p = softmax(z)`` (loss: mean over rows);
* ``"bernoulli"``: logits, ``H = diag(p(1 − p))``, ``p = σ(z)`` (loss: summed over the last
  dimension, mean over rows);
* ``"gaussian"``/``"mse"``: ``H = I`` (loss: ``½‖y − z‖²`` summed over the last dimension, mean over rows).

The loss the closure returns must follow that convention (these are also the conventions of
:func:`cgfac.fisher.sampled_loss`).

Every ``damping_interval`` (``T``) steps the Levenberg–Marquardt rule (§6.5) adapts ``λ`` from the
reduction ratio on the same batch ::

    ρ = (h(θ + δ) − h(θ)) / (M(δ) − M(0)),  M without λ (kfac-jax's default)
    λ ← λ / ω if ρ < 1/4,   λ ← λ · ω if ρ > 3/4,   ω = damping_decay^T,  λ ∈ [min_damping, max_damping]

A non-finite ``ρ`` counts as a failure. ``h(θ + δ)`` needs the loss at the new point: the closure is
called once more (with curvature capture paused; its gradients are discarded and the model's
buffers, e.g. BatchNorm running statistics, restored), so adaptive damping requires
``step(closure)``. A non-finite loss at the new point undoes the update.

Units: ``λ`` is in the units of the Fisher of the *mean* loss with per-sample gradients (as
kfac-jax's). kfac-pytorch builds ``G`` from the mean loss's output gradients, ``1/n²`` of this
library's, so its ``damping`` corresponds to ``damping · n²`` here (``n``: the batch size).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

try:  # torch >= 2.3: fused attention kernels have no forward-mode AD; the math kernel does
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _forward_ad_attention() -> Any:
        return sdpa_kernel(SDPBackend.MATH)
except ImportError:  # pragma: no cover - torch 2.2
    import contextlib

    def _forward_ad_attention() -> Any:
        return contextlib.nullcontext()

from cgfac import sharded
from cgfac.base import Preconditioner
from cgfac.cgfac import CGFAC as _CGFACPreconditioner
from cgfac.fisher import LOSS_TYPES
from cgfac.hyperparams import check_range, choice, positive_int
from cgfac.kfac import KFAC as _KFACPreconditioner
from cgfac.options import LossType
from cgfac.transformer_kfac import TransformerKFAC, hidden_matrices

ADAPTIVE = ("lr+momentum", "lr", "none")


def _last(t: Tensor, k: int) -> Tensor:
    """The last ``k`` batch entries of ``t`` (all of them where the batch is smaller)."""
    return t[-k:] if k < t.shape[0] else t


def _grad(p: Tensor) -> Tensor:
    """``p.grad``, which every parameter of an update has (:meth:`SecondOrderOptimizer.step`
    takes only those with a gradient)."""
    if p.grad is None:
        raise RuntimeError("a parameter of the update lost its .grad")
    return p.grad


def output_quad_form(outputs: Tensor, u: Tensor, w: Tensor, loss_type: str) -> Tensor:
    """``(1/r) Σ_rows uᵀ H w`` with ``H`` the Hessian of the likelihood ``loss_type`` at ``outputs``.

    Rows are every leading position of ``outputs`` (last dimension: classes or features); the
    sum is in float64.
    """
    z = outputs.reshape(-1, outputs.shape[-1]).double()
    u = u.reshape(z.shape).double()
    w = w.reshape(z.shape).double()
    rows = z.shape[0]
    if loss_type == "cross_entropy":
        p = torch.softmax(z, dim=-1)
        return ((p * u * w).sum() - ((p * u).sum(-1) * (p * w).sum(-1)).sum()) / rows
    if loss_type == "bernoulli":
        p = torch.sigmoid(z)
        return (p * (1 - p) * u * w).sum() / rows
    if loss_type in ("gaussian", "mse"):
        return (u * w).sum() / rows
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


class _Forward:
    """One recorded forward pass of the model: its inputs, RNG state and (detached) outputs."""

    __slots__ = ("args", "kwargs", "loss", "outputs", "rng", "rows")

    def __init__(self, args: tuple, kwargs: dict, outputs: Tensor, rng: dict[str, Tensor],
                 loss: float | None = None) -> None:
        self.args, self.kwargs, self.outputs, self.rng, self.loss = args, kwargs, outputs, rng, loss
        self.rows = outputs.reshape(-1, outputs.shape[-1]).shape[0] if outputs.dim() > 0 else 1


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Base of :class:`cgfac.optim.KFAC` and :class:`cgfac.optim.CGFAC` (see the module docstring).

    Args:
        model: the module to train; every trainable parameter is optimised (one param group).
        preconditioner: a :class:`cgfac.KFAC` or :class:`cgfac.CGFAC` on ``model``.
        lr: multiplies the step ``α`` (1 keeps the quadratic model's step; with ``adaptive="none"``
            it is the step size itself). Schedulers act on it as usual.
        momentum: ``μ`` when it is not adapted.
        weight_decay: L2 coefficient ``wd``, added to the gradient before preconditioning and to the
            curvature of the quadratic model (the loss is ``h + ½ wd ‖θ‖²``).
        loss_type: the likelihood of the loss (see the module docstring); needed for the exact
            quadratic model, and for ``fisher="true"`` (targets are then sampled automatically).
        adaptive: ``"lr+momentum"``, ``"lr"`` or ``"none"``.
        adapt_damping: Levenberg–Marquardt adaptation of ``λ`` (needs ``step(closure)``).
        damping_interval: ``T``, steps between adaptations.
        damping_decay: ``ω = damping_decay^T``.
        min_damping: the lower end of ``λ``'s range.
        max_damping: the upper end of ``λ``'s range.
        quad_samples: use only the *last* this-many samples of each recorded forward for the
            curvature products of the quadratic model (None: all). The curvature's own rows
            (``curvature_samples``) are the *first* entries, so where the batch holds both the two
            sets are disjoint: a direction built from ``m`` samples' rank-``m`` curvature has its
            largest components where those samples see no curvature, and a model measured on the
            same samples would not see the curvature there either (it overrates the step; on a
            300-wide layer with 16 rows, loss 27 → 2·10⁷ in five steps).
        sample_subset: with ``fisher="true"`` and ``curvature_samples`` below the batch, sample the
            targets on a second forward of the kept entries alone instead of back-propagating
            them through the whole batch (:meth:`_sample_subset`: ``m/n`` of the cost, the same
            rows); off for models with BatchNorm, whose training forward depends on the batch.
        reject_worse: when ``λ`` is adapted and the loss on the update's own batch went *up*
            (``h(θ + δ) > h(θ)``), undo the update and drop the momentum (a trust-region
            rejection; counted in ``rejected_steps``). A non-finite loss is always undone.
        output_fn: ``output_fn(model_output) -> Tensor``, the outputs ``z`` of the likelihood when
            the model returns something else (a Hugging Face ``ModelOutput``: its logits; see
            :mod:`cgfac.integrations.transformers`). Default: the model's output, a tensor.
        loss_fn: ``loss_fn(model_output, args, kwargs) -> Tensor``, the mean loss of one recorded
            forward from its output and inputs. With it, ``step()`` needs no closure, even with
            adaptive damping (``Trainer`` calls ``optimizer.step()`` without one): ``h(θ)`` is the
            rows-weighted mean over this step's recorded forwards, and ``h(θ + δ)`` re-runs those
            forwards (inputs and random state replayed, no grad) at the new point. With a closure
            too, the damping check uses the replay as well: a forward instead of the closure's
            forward and backward (``step`` still returns the closure's loss).
    """

    def __init__(
        self,
        model: nn.Module,
        preconditioner: Preconditioner,
        *,
        lr: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss_type: str | None = None,
        adaptive: str = "lr+momentum",
        adapt_damping: bool = True,
        damping_interval: int = 5,
        damping_decay: float = 0.95,
        min_damping: float = 1e-3,
        max_damping: float = 1e6,
        quad_samples: int | None = None,
        reject_worse: bool = True,
        sample_subset: bool = True,
        output_fn: Callable[[Any], Tensor] | None = None,
        loss_fn: Callable[[Any, tuple, dict], Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"preconditioner must be a cgfac Preconditioner, got {type(preconditioner).__name__}")
        check_range("lr", lr, low=0.0, low_open=True, high=None)
        check_range("momentum", momentum, low=0.0, low_open=False, high=None)
        check_range("weight_decay", weight_decay, low=0.0, low_open=False, high=None)
        self.adaptive = choice("adaptive", adaptive, ADAPTIVE)
        if loss_type is not None:
            choice("loss_type", loss_type, LOSS_TYPES)
        if self.adaptive != "none" and loss_type is None:
            raise ValueError(f"loss_type is needed by adaptive={adaptive!r} (the quadratic model's curvature); "
                             f"one of {LOSS_TYPES}, or adaptive='none'")
        if preconditioner.fisher == "true" and loss_type is None:
            raise ValueError("loss_type is needed by fisher='true' (targets are sampled from the model's outputs)")
        if adapt_damping and self.adaptive == "none":
            raise ValueError("adapt_damping needs the quadratic model: set adaptive='lr' or 'lr+momentum', "
                             "or adapt_damping=False")
        if not isinstance(adapt_damping, bool):
            raise TypeError(f"adapt_damping must be a bool, got {type(adapt_damping).__name__}")
        if not isinstance(reject_worse, bool):
            raise TypeError(f"reject_worse must be a bool, got {type(reject_worse).__name__}")
        self.reject_worse = reject_worse
        if not isinstance(sample_subset, bool):
            raise TypeError(f"sample_subset must be a bool, got {type(sample_subset).__name__}")
        self.sample_subset = sample_subset
        self._batch_dependent = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        for arg, fn in (("output_fn", output_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{arg} must be callable or None, got {type(fn).__name__}")
        self.output_fn, self.loss_fn = output_fn, loss_fn
        self.rejected_steps = 0
        self.loss_type = loss_type
        self.adapt_damping = adapt_damping
        self.damping_interval = positive_int("damping_interval", damping_interval)
        self.damping_decay = check_range("damping_decay", damping_decay, low=0.0, low_open=True, high=1.0)
        self.min_damping = check_range("min_damping", min_damping, low=0.0, low_open=True, high=None)
        self.max_damping = check_range("max_damping", max_damping, low=self.min_damping, low_open=False, high=None)
        self.quad_samples = positive_int("quad_samples", quad_samples, allow_none=True)
        if preconditioner.model is not model:
            raise ValueError("preconditioner must be built on the same model")
        if callable(preconditioner.damping.value):
            raise ValueError("damping: the optimizer adapts λ itself; give a float, not a schedule")
        if preconditioner.kl_clip is not None and self.adaptive != "none":
            raise ValueError("kl_clip: the quadratic model sets the step; use kl_clip=None with adaptive steps")
        self.model = model
        self.preconditioner = preconditioner
        params = [p for p in model.parameters() if p.requires_grad]
        if self.adaptive != "none" and any(sharded.is_sharded(p) for p in params):
            raise ValueError(
                f"adaptive={adaptive!r}: the quadratic model needs forward-mode AD through the model, which FSDP2's "
                "sharded (DTensor) parameters do not support (fwAD.make_dual: aten._has_same_storage_numel has no "
                "DTensor sharding strategy), and its curvature products are this rank's batch only (not reduced "
                "across ranks); use adaptive='none', adapt_damping=False under FSDP2")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.damping = float(preconditioner.damping.value)
        self.steps = 0
        self.skipped_steps = 0
        self.last: dict[str, float] = {}
        self._forwards: list[_Forward] = []
        self._recording = True
        self._names = {p: n for n, p in model.named_parameters()}
        self._handle: RemovableHandle | None = model.register_forward_hook(self._root_hook, with_kwargs=True)
        self._pre_handle: RemovableHandle | None = model.register_forward_pre_hook(self._root_pre_hook)
        self._rng: dict[str, Tensor] = {}

    # --- recording the closure's forward ------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._recording and module.training and torch.is_grad_enabled():
            self._rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._rng["cuda"] = torch.cuda.get_rng_state()

    def _root_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self._recording and module.training and torch.is_grad_enabled()):
            return
        raw = output
        if self.output_fn is not None:
            output = self.output_fn(output)
        if not isinstance(output, Tensor):
            if self.adaptive != "none" or self.preconditioner.fisher == "true":
                raise TypeError(f"the model must return a Tensor for the quadratic model and the true Fisher, "
                                f"got {type(output).__name__} (give output_fn to pick it)")
            return
        loss = None
        if self.loss_fn is not None:
            with torch.no_grad():
                loss = float(self.loss_fn(raw, args, kwargs))
        self._forwards.append(_Forward(args, kwargs, output.detach(), self._rng, loss))
        if self.preconditioner.fisher == "true" and output.requires_grad and not self._subset_sampling(args):
            self.preconditioner.sample_fisher(output, cast(LossType, self.loss_type or ""))

    def _subset_sampling(self, args: tuple) -> bool:
        """Whether the true Fisher's sampled backward runs on a forward of the kept samples alone
        (:meth:`_sample_subset`): ``sample_subset``, ``curvature_samples`` below this forward's
        batch, and no module whose training forward depends on the batch (BatchNorm)."""
        limit = getattr(self.preconditioner, "curvature_samples", None)
        first = next((a for a in args if isinstance(a, Tensor) and a.dim() > 0), None)
        return (self.sample_subset and limit is not None and first is not None and first.shape[0] > limit
                and not self._batch_dependent)

    @torch.no_grad()
    def _sample_subset(self, forwards: list[_Forward]) -> None:
        """True Fisher from a forward of the first ``curvature_samples`` batch entries only.

        The user's backward through the whole batch gives ``∇W``; the curvature needs the sampled
        targets' output gradients of the kept entries alone, so instead of a second backward
        through the whole batch (to every layer's output) the kept entries are run forward again
        (same parameters and random state, buffers untouched) and their sampled loss is
        back-propagated: ``m/n`` of a forward and of a backward to the layers' outputs, for
        ``m = curvature_samples`` of a batch of ``n``. The rows are those the full pass would keep.
        """
        pre = self.preconditioner
        left = cast(int, pre.capture_limit())
        named = dict(self.model.named_parameters())
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        self._recording = False
        try:
            for fwd in forwards:
                if left <= 0:
                    break
                first = next(a for a in fwd.args if isinstance(a, Tensor) and a.dim() > 0)
                k = min(left, first.shape[0])
                left -= k
                args = tuple(a[:k] if isinstance(a, Tensor) and a.dim() > 0 else a for a in fwd.args)
                devices = [torch.cuda.current_device()] if "cuda" in fwd.rng else []
                with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                        torch.profiler.record_function("cgfac.optim.subset_forward"):
                    if "cpu" in fwd.rng:
                        torch.set_rng_state(fwd.rng["cpu"])
                    if "cuda" in fwd.rng:
                        torch.cuda.set_rng_state(fwd.rng["cuda"])
                    out = torch.func.functional_call(self.model, {**named, **buffers}, args, fwd.kwargs)
                    pre.sample_fisher(out, cast(LossType, self.loss_type or ""))
        finally:
            self._recording = True

    def _recorded_loss(self, forwards: list[_Forward]) -> float | None:
        """``h(θ)`` from ``loss_fn`` at the recorded forwards: their rows-weighted mean."""
        if self.loss_fn is None or not forwards or any(f.loss is None for f in forwards):
            return None
        total = sum(f.rows for f in forwards)
        return sum(cast(float, f.loss) * f.rows for f in forwards) / total

    def _replay_loss(self) -> float:
        """``h`` at the current parameters: the recorded forwards re-run (inputs, random state)
        without grad, their ``loss_fn`` averaged by rows (the closure of ``step()`` without one)."""
        assert self.loss_fn is not None
        total, rows = 0.0, 0
        for fwd in self._forwards:
            devices = [torch.cuda.current_device()] if "cuda" in fwd.rng else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if "cpu" in fwd.rng:
                    torch.set_rng_state(fwd.rng["cpu"])
                if "cuda" in fwd.rng:
                    torch.cuda.set_rng_state(fwd.rng["cuda"])
                out = self.model(*fwd.args, **fwd.kwargs)
                total += float(self.loss_fn(out, fwd.args, fwd.kwargs)) * fwd.rows
            rows += fwd.rows
        return total / rows

    # --- curvature products -------------------------------------------------------------------
    def _tangent_outputs(self, fwd: _Forward, tangents: dict[str, Tensor]) -> Tensor:
        """``J v`` at a recorded forward: the model run once in forward mode, buffers untouched."""
        named = dict(self.model.named_parameters())
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        args, kwargs = fwd.args, fwd.kwargs
        if self.quad_samples is not None:
            args = tuple(_last(a, self.quad_samples) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)
        devices = [torch.cuda.current_device()] if "cuda" in fwd.rng else []
        self._recording = False
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), fwAD.dual_level(), \
                    _forward_ad_attention():
                if "cpu" in fwd.rng:
                    torch.set_rng_state(fwd.rng["cpu"])
                if "cuda" in fwd.rng:
                    torch.cuda.set_rng_state(fwd.rng["cuda"])
                params = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in named.items()}
                out = torch.func.functional_call(self.model, {**params, **buffers}, args, kwargs)
                if self.output_fn is not None:
                    out = self.output_fn(out)
                tangent = fwAD.unpack_dual(out).tangent
        finally:
            self._recording = True
        if tangent is None:
            tangent = torch.zeros_like(out)
        return tangent

    def _curvature_gram(self, vectors: list[dict[str, Tensor]]) -> Tensor:
        """``[vᵢᵀ C vⱼ]`` (float64): the exact GGN over every forward recorded this step, each
        weighted by its share of the rows."""
        assert self.loss_type is not None
        k = len(vectors)
        gram = torch.zeros(k, k, dtype=torch.float64)
        parts = []
        for fwd in self._forwards:
            outputs = fwd.outputs if self.quad_samples is None else _last(fwd.outputs, self.quad_samples)
            parts.append((fwd, outputs, outputs.reshape(-1, outputs.shape[-1]).shape[0]))
        total = sum(rows for _, _, rows in parts)
        for fwd, outputs, rows in parts:
            jv = [self._tangent_outputs(fwd, v) for v in vectors]
            for i in range(k):
                for j in range(i, k):
                    q = output_quad_form(outputs, jv[i], jv[j], self.loss_type).cpu() * (rows / total)
                    gram[i, j] += q
                    if i != j:
                        gram[j, i] += q
        return gram

    # --- the step -----------------------------------------------------------------------------
    def _loss_value(self, closure: Callable[[], Any]) -> float:
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("closure must return the loss")
        return float(loss.detach() if isinstance(loss, Tensor) else loss)

    def _l2(self, undo: dict[Tensor, Tensor] | None = None) -> float:
        """``½ Σ wd ‖θ‖²`` over every parameter, at ``θ − undo`` where ``undo`` is given (the
        point before an update)."""
        undo = undo or {}
        total = 0.0
        for group in self.param_groups:
            if group["weight_decay"]:
                total += 0.5 * group["weight_decay"] * sum(
                    float((p.detach() - undo[p] if p in undo else p.detach()).double().pow(2).sum())
                    for p in group["params"])
        return total

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update. ``closure`` (zero the gradients, forward, backward, return the loss) is
        required for adaptive damping; without it, a forward and backward must have run."""
        if closure is None and self.adapt_damping and self.loss_fn is None:
            raise ValueError("closure: adapt_damping=True needs step(closure) to measure the loss at the new "
                             "point, or loss_fn to read it from re-run forwards (Hugging Face Trainer: "
                             "cgfac.integrations.transformers.causal_lm_loss), or adapt_damping=False")
        loss = None
        if closure is not None:
            self._forwards = []
            with torch.enable_grad():
                loss = closure()
            if loss is None:
                raise ValueError("closure must return the loss")
        forwards, self._forwards = self._forwards, []
        h0 = loss
        if self.loss_fn is not None:  # h(θ) and the damping check's h(θ + δ) both from loss_fn, forward only
            recorded = self._recorded_loss(forwards)
            if recorded is None and closure is None and self.adapt_damping:
                raise ValueError("loss_fn: no forward of the model was recorded since the last step (a training "
                                 "forward with grad enabled must run before step())")
            if recorded is not None:
                h0, closure = recorded, self._replay_loss
                if loss is None:
                    loss = recorded
        pre = self.preconditioner
        if pre.fisher == "true" and forwards and self._subset_sampling(forwards[0].args):
            self._sample_subset(forwards)
        # ∇h with the L2 term; kept for the model's linear term.
        grads: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.grad.add_(p, alpha=group["weight_decay"])
                grads[p] = p.grad.clone()
        pre.damping.value = self.damping
        pre.damping_offset = self._max_weight_decay()
        skipped = pre.skipped_steps
        pre.step()
        if pre.skipped_steps != skipped or not grads:
            self.skipped_steps += 1
            return loss
        self._forwards = forwards
        try:
            self._update(grads, h0, closure)
        finally:
            self._forwards = []
        self.steps += 1
        return loss

    @staticmethod
    def _inner_products(vectors: list[dict[Tensor, Tensor]], grads: dict[Tensor, Tensor], params: list[Tensor],
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

    def _param_damping(self, damping: float) -> dict[Tensor, float]:
        """Each covered parameter's damping in this step's solve (``layer_stats()[name]["damping"]``:
        ``λ + wd``, or ``λ·s_l + wd`` with ``damping_scale="relative"``); others use ``damping``."""
        pre = self.preconditioner
        out: dict[Tensor, float] = {}
        for name, helper in pre.layers.items():
            lam = pre.stats.get(name, {}).get("damping")
            if lam is None or "fallback" in pre.stats.get(name, {}):
                continue
            for unit in helper.units():
                for p in unit.params():
                    out[p] = float(lam)
        return out

    def _max_weight_decay(self) -> float:
        return max((g["weight_decay"] for g in self.param_groups), default=0.0)

    def _update(self, grads: dict[Tensor, Tensor], loss: Any, closure: Callable[[], Any] | None) -> None:
        params = list(grads)
        delta = {p: -_grad(p) for p in params}  # Δ = −(C̃ + λI)⁻¹ ∇h
        prev = {p: self.state[p].get("prev_update") for p in params}
        has_prev = all(v is not None for v in prev.values()) and self.steps > 0
        lr = {p: g["lr"] for g in self.param_groups for p in g["params"]}
        mom = {p: g["momentum"] for g in self.param_groups for p in g["params"]}
        damping = self.damping + self._max_weight_decay()
        info: dict[str, float] = {"damping": self.damping}
        coeffs: tuple[float, float]
        quad_change: float | None = None
        if self.adaptive == "none":
            alpha, mu = 1.0, 1.0
            coeffs = (alpha, mu)
        else:
            vectors = [delta] + ([prev] if has_prev else [])
            names = [{self._names[p]: v[p] for p in params} for v in vectors]  # type: ignore[index]
            with record_function("cgfac.optim.quad_model"):
                gram = self._curvature_gram(names)  # vᵢᵀ C vⱼ
            lam = self._param_damping(damping)  # λ_p: the damping each parameter's solve used
            dots, damped_dots, lin = self._inner_products(vectors, grads, params, lam, damping)
            damped = gram + damped_dots
            info.update(dir_curvature=float(gram[0, 0]), dir_grad=float(lin[0]))
            c = self._solve_coefficients(damped, lin, has_prev, mom)
            if c is None:
                self.skipped_steps += 1
                self.damping = min(self.max_damping, self.damping / self._omega())
                warnings.warn("cgfac: the quadratic model gave no finite step; step skipped, damping raised",
                              RuntimeWarning, stacklevel=3)
                for p in params:
                    _grad(p).copy_(grads[p])
                return
            coeffs = c
            alpha, mu = c
            # Model change of the update actually applied (group lr scales α), without damping.
            scale = [alpha * lr[params[0]], mu] if has_prev else [alpha * lr[params[0]]]
            v = torch.tensor(scale, dtype=torch.float64)
            quad_change = float(lin @ v + 0.5 * v @ (gram + self._max_weight_decay() * dots) @ v)
            info.update(alpha=alpha, mu=mu if has_prev else 0.0, quad_change=quad_change)
        # The update, δ = lr α Δ + μ δ₀.
        updates = {}
        for p in params:
            u = delta[p].mul(lr[p] * coeffs[0])
            if prev[p] is not None and self.steps > 0:
                u.add_(prev[p], alpha=coeffs[1] * (mom[p] if self.adaptive == "none" else 1.0))
            updates[p] = u
        if not bool(torch.stack([u.sum() for u in updates.values()]).sum().isfinite()):  # one read, one pass
            self.skipped_steps += 1
            warnings.warn("cgfac: non-finite update; step skipped", RuntimeWarning, stacklevel=3)
            return
        for p in params:
            p.add_(updates[p])
            self.state[p]["prev_update"] = updates[p]
            _grad(p).copy_(grads[p])
        if self.adapt_damping and closure is not None and (self.steps + 1) % self.damping_interval == 0:
            with record_function("cgfac.optim.damping_check"):
                info.update(self._adapt_damping(float(loss), quad_change, closure, updates))
            for p in params:  # the evaluation's gradients are discarded: .grad is ∇h at θ again
                if p.grad is None:
                    p.grad = grads[p].clone()
                else:
                    p.grad.copy_(grads[p])
        self.last = info

    def _omega(self) -> float:
        return self.damping_decay ** self.damping_interval

    def _solve_coefficients(self, damped: Tensor, lin: Tensor, has_prev: bool,
                            mom: dict[Tensor, float]) -> tuple[float, float] | None:
        """Minimise ``½ cᵀ damped c + linᵀ c`` over the adapted coefficients."""
        if not (torch.isfinite(damped).all() and torch.isfinite(lin).all()):
            return None
        momentum = next(iter(mom.values()))
        if self.adaptive == "lr+momentum" and has_prev:
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

    def _adapt_damping(self, loss: float, quad_change: float | None, closure: Callable[[], Any],
                       updates: dict[Tensor, Tensor]) -> dict[str, float]:
        pre = self.preconditioner
        self._recording = False
        # The evaluation is not a training forward: buffers (BatchNorm running statistics) are kept.
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        try:
            new_loss = self._loss_value(closure) + self._l2()
        finally:
            pre.discard_captured()
            self._recording = True
            for b, saved in buffers:
                b.copy_(saved)
        old_loss = loss + self._l2(undo=updates)
        finite = math.isfinite(new_loss)
        rejected = not finite or (self.reject_worse and new_loss > old_loss)
        if rejected:
            for p, u in updates.items():
                p.sub_(u)
                self.state[p].pop("prev_update", None)
            self.rejected_steps += 1
        if not finite:
            warnings.warn("cgfac: non-finite loss after the update; update undone, damping raised",
                          RuntimeWarning, stacklevel=4)
        rho = (new_loss - old_loss) / quad_change if quad_change is not None and quad_change < 0 else -math.inf
        if not math.isfinite(rho) or rho < 0.25:
            self.damping = min(self.max_damping, self.damping / self._omega())
        elif rho > 0.75:
            self.damping = max(self.min_damping, self.damping * self._omega())
        return {"rho": rho, "new_loss": new_loss, "damping_next": self.damping, "rejected": float(rejected)}

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state (per-parameter previous updates, param groups), the adapted
        damping and counters, and the preconditioner's own state."""
        state = super().state_dict()
        state["cgfac"] = {"damping": self.damping, "steps": self.steps, "skipped_steps": self.skipped_steps,
                          "rejected_steps": self.rejected_steps, "preconditioner": self.preconditioner.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "cgfac" not in state_dict:
            raise ValueError("state_dict: not saved from a cgfac optimizer (no 'cgfac' entry)")
        ours = state_dict["cgfac"]
        self.preconditioner.load_state_dict(ours["preconditioner"])
        rest = {k: v for k, v in state_dict.items() if k != "cgfac"}
        super().load_state_dict(rest)
        self.damping = float(ours["damping"])
        self.steps = int(ours["steps"])
        self.skipped_steps = int(ours["skipped_steps"])
        self.rejected_steps = int(ours.get("rejected_steps", 0))

    def remove(self) -> None:
        """Remove every hook (the optimizer's and the preconditioner's)."""
        for h in (self._handle, self._pre_handle):
            if h is not None:
                h.remove()
        self._handle = self._pre_handle = None
        self.preconditioner.remove()


_OPTIMIZER_ARGS = ("lr", "momentum", "weight_decay", "loss_type", "adaptive", "adapt_damping", "damping_interval",
                   "damping_decay", "min_damping", "max_damping", "quad_samples", "reject_worse", "sample_subset",
                   "output_fn", "loss_fn")


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    opt = {k: v for k, v in kwargs.items() if k in _OPTIMIZER_ARGS}
    pre = {k: v for k, v in kwargs.items() if k not in _OPTIMIZER_ARGS}
    return opt, pre


class KFAC(SecondOrderOptimizer):
    """K-FAC that owns the update: :class:`cgfac.KFAC` directions, the quadratic-model step and
    momentum, Levenberg–Marquardt damping (see the module docstring).

    ``cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=1e-2)``; every keyword of
    :class:`SecondOrderOptimizer` (``lr``, ``momentum``, ``adaptive``, ...) and of
    :class:`cgfac.KFAC` (``damping`` — the initial λ —, ``factor_decay``, ``inv_update_steps``,
    ``fisher``, ...) is accepted. ``kl_clip`` defaults to None: the quadratic model sets the step.
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-2, kl_clip: float | None = None,
                 **kwargs: Any) -> None:
        opt, pre = _split(kwargs)
        super().__init__(model, _KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, **pre), **opt)


class CGFAC(SecondOrderOptimizer):
    """CG-FAC that owns the update: :class:`cgfac.CGFAC` directions (warm-started CG, low-rank or
    eigen solves chosen per layer as ``λ`` moves), the quadratic-model step and momentum,
    Levenberg–Marquardt damping (see the module docstring). Keywords as :class:`KFAC`'s, with
    :class:`cgfac.CGFAC`'s (``curvature``, ``solver``, ``curvature_window``, ...)."""

    def __init__(self, model: nn.Module, *, damping: float = 1e-2, kl_clip: float | None = None,
                 **kwargs: Any) -> None:
        opt, pre = _split(kwargs)
        super().__init__(model, _CGFACPreconditioner(model, damping=damping, kl_clip=kl_clip, **pre), **opt)

    @classmethod
    def wide(cls, model: nn.Module, *, loss_type: str, **overrides: Any) -> CGFAC:
        """CG-FAC configured for wide layers (:data:`WIDE_DEFAULTS`, any keyword overrides them):
        128 curvature rows per step whatever the batch (the true Fisher sampled on those samples
        alone), the exact low-rank solve of this step's rows (QR of the rows, ``r × r``
        eigendecompositions; no warm start kept), factored damping adapted by the LM rule from
        ``λ₀ = 0.1``, the quadratic model on 128 other samples of the batch (its last). Tuned on the ×4 autoencoder
        (``benchmarks/tuning-autoencoder-wide``), where it trains fastest per second."""
        return cls(model, loss_type=loss_type, **{**WIDE_DEFAULTS, **overrides})


WIDE_DEFAULTS: dict[str, Any] = {
    "curvature_samples": 128, "curvature_window": 1, "solver": "lowrank", "damping_form": "factored",
    "fisher": "true", "damping": 0.1, "min_damping": 1e-3, "quad_samples": 128,
}
"""The settings of :meth:`CGFAC.wide` (the tuned ×4 autoencoder's)."""

__all__ = ["CGFAC", "KFAC", "WIDE_DEFAULTS", "SecondOrderOptimizer", "TransformerKFAC", "hidden_matrices",
           "output_quad_form"]
