"""The step of :class:`SecondOrderOptimizer` (see :mod:`cgfac.optim`): the preconditioner's
direction, the quadratic model's coefficients (:mod:`cgfac.optim.quadratic`), the update, and the
Levenberg–Marquardt check of ``λ`` (:mod:`cgfac.optim.damping`) on the forwards recorded by
:mod:`cgfac.optim.replay`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from cgfac.config import Adaptive, check_range, choice, positive_int, values
from cgfac.distributed import sharded
from cgfac.losses import LOSS_TYPES
from cgfac.optim.damping import LevenbergMarquardt
from cgfac.optim.quadratic import ModelSchedule, QuadraticModel, fit_coefficients
from cgfac.optim.replay import Forward, ForwardRecorder, evaluation_loss
from cgfac.precondition.base import Preconditioner

__all__ = ["ADAPTIVE", "SecondOrderOptimizer"]

ADAPTIVE = values(Adaptive)


def _grad(p: Tensor) -> Tensor:
    """``p.grad``, which every parameter of an update has (:meth:`SecondOrderOptimizer.step`
    takes only those with a gradient)."""
    if p.grad is None:
        raise RuntimeError("a parameter of the update lost its .grad")
    return p.grad


def _check_flags(adaptive: str, loss_type: str | None, fisher: str, adapt_damping: bool, reject_worse: bool,
                 sample_subset: bool) -> None:
    if loss_type is not None:
        choice("loss_type", loss_type, LOSS_TYPES)
    if adaptive != "none" and loss_type is None:
        raise ValueError(f"loss_type is needed by adaptive={adaptive!r} (the quadratic model's curvature); "
                         f"one of {LOSS_TYPES}, or adaptive='none'")
    if fisher == "true" and loss_type is None:
        raise ValueError("loss_type is needed by fisher='true' (targets are sampled from the model's outputs)")
    if adapt_damping and adaptive == "none":
        raise ValueError("adapt_damping needs the quadratic model: set adaptive='lr' or 'lr+momentum', "
                         "or adapt_damping=False")
    for arg, flag in (("adapt_damping", adapt_damping), ("reject_worse", reject_worse),
                      ("sample_subset", sample_subset)):
        if not isinstance(flag, bool):
            raise TypeError(f"{arg} must be a bool, got {type(flag).__name__}")


def _check_model(model: nn.Module, preconditioner: Preconditioner, adaptive: str, params: Sequence[Tensor]) -> None:
    if preconditioner.model is not model:
        raise ValueError("preconditioner must be built on the same model")
    if callable(preconditioner.damping.value):
        raise ValueError("damping: the optimizer adapts λ itself; give a float, not a schedule")
    if preconditioner.kl_clip is not None and adaptive != "none":
        raise ValueError("kl_clip: the quadratic model sets the step; use kl_clip=None with adaptive steps")
    if adaptive != "none" and any(sharded.is_sharded(p) for p in params):
        raise ValueError(
            f"adaptive={adaptive!r}: the quadratic model needs forward-mode AD through the model, which FSDP2's "
            "sharded (DTensor) parameters do not support (fwAD.make_dual: aten._has_same_storage_numel has no "
            "DTensor sharding strategy), and its curvature products are this rank's batch only (not reduced "
            "across ranks); use adaptive='none', adapt_damping=False under FSDP2")


def l2_term(param_groups: list[dict[str, Any]], undo: dict[Tensor, Tensor] | None = None) -> float:
    """``½ Σ wd ‖θ‖²`` over every parameter, at ``θ − undo`` where ``undo`` is given (the
    point before an update)."""
    undo = undo or {}
    total = 0.0
    for group in param_groups:
        if group["weight_decay"]:
            total += 0.5 * group["weight_decay"] * sum(
                float((p.detach() - undo[p] if p in undo else p.detach()).double().pow(2).sum())
                for p in group["params"])
    return total


def regularised_grads(param_groups: list[dict[str, Any]]) -> dict[Tensor, Tensor]:
    """``∇h`` with the L2 term added to each ``.grad``; a copy kept for the model's linear term."""
    grads: dict[Tensor, Tensor] = {}
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if group["weight_decay"]:
                p.grad.add_(p, alpha=group["weight_decay"])
            grads[p] = p.grad.clone()
    return grads


def param_damping(pre: Preconditioner) -> dict[Tensor, float]:
    """Each covered parameter's damping in this step's solve (``layer_stats()[name]["damping"]``:
    ``λ + wd``, or ``λ·s_l + wd`` with ``damping_scale="relative"``); the others are absent."""
    out: dict[Tensor, float] = {}
    for name, helper in pre.layers.items():
        lam = pre.stats.get(name, {}).get("damping")
        if lam is None or "fallback" in pre.stats.get(name, {}):
            continue
        for unit in helper.units():
            for p in unit.params():
                out[p] = float(lam)
    return out


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
            sets are disjoint (a model measured on the curvature's own samples overrates the step
            where their rank-``m`` curvature sees nothing: loss 27 → 2·10⁷ in five steps, 16 rows).
        quad_every: the longest period, in steps, between evaluations of the quadratic model; its
            ``(α, μ)`` are reused in between (1: every step). The period grows while the
            coefficients stay within ``quad_tol`` and the model is always evaluated where the
            damping check is due (:class:`cgfac.optim.quadratic.ModelSchedule` states the rule).
        quad_tol: the relative change of ``α`` and ``μ`` under which the period doubles; a change of
            ``λ`` by more than a factor ``1 + quad_tol`` restarts it.
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
        quad_every: int = 1,
        quad_tol: float = 0.1,
        reject_worse: bool = True,
        sample_subset: bool = True,
        output_fn: Callable[[Any], Tensor] | None = None,
        loss_fn: Callable[[Any, tuple, dict], Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"preconditioner must be a cgfac Preconditioner, got {type(preconditioner).__name__}")
        for name, value, low_open in (("lr", lr, True), ("momentum", momentum, False),
                                      ("weight_decay", weight_decay, False)):
            check_range(name, value, low=0.0, low_open=low_open, high=None)
        self.adaptive = choice("adaptive", adaptive, ADAPTIVE)
        _check_flags(self.adaptive, loss_type, preconditioner.fisher, adapt_damping, reject_worse, sample_subset)
        for arg, fn in (("output_fn", output_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{arg} must be callable or None, got {type(fn).__name__}")
        self.reject_worse, self.sample_subset = reject_worse, sample_subset
        self.output_fn, self.loss_fn = output_fn, loss_fn
        self.rejected_steps = 0
        self.loss_type, self.adapt_damping = loss_type, adapt_damping
        self.damping_interval = positive_int("damping_interval", damping_interval)
        self.damping_decay = check_range("damping_decay", damping_decay, low=0.0, low_open=True, high=1.0)
        self.min_damping = check_range("min_damping", min_damping, low=0.0, low_open=True, high=None)
        self.max_damping = check_range("max_damping", max_damping, low=self.min_damping, low_open=False, high=None)
        self.quad_samples = positive_int("quad_samples", quad_samples, allow_none=True)
        self.schedule = ModelSchedule(positive_int("quad_every", quad_every),
                                      check_range("quad_tol", quad_tol, low=0.0, low_open=False, high=None))
        params = [p for p in model.parameters() if p.requires_grad]
        _check_model(model, preconditioner, self.adaptive, params)
        self.model, self.preconditioner = model, preconditioner
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.damping = float(cast(float, preconditioner.damping.value))  # a float: _check_model
        self.steps = self.skipped_steps = 0
        self.last: dict[str, float] = {}
        self._forwards: list[Forward] = []  # the forwards of the step under way
        self._names: dict[Tensor, str] = {p: n for n, p in model.named_parameters()}
        self.recorder = ForwardRecorder(model, preconditioner, loss_type=loss_type, sample_subset=sample_subset,
                                        needs_tensor=self.adaptive != "none" or preconditioner.fisher == "true",
                                        output_fn=output_fn, loss_fn=loss_fn)
        self.quadratic = QuadraticModel(model, self.recorder, loss_type, self.quad_samples, output_fn)

    @property
    def rule(self) -> LevenbergMarquardt:
        """The damping rule of the current settings (:mod:`cgfac.optim.damping`)."""
        return LevenbergMarquardt(self.damping_interval, self.damping_decay, self.min_damping, self.max_damping)

    def _curvature_gram(self, vectors: list[dict[str, Tensor]]) -> Tensor:
        """``[vᵢᵀ C vⱼ]`` over this step's forwards (:meth:`cgfac.optim.quadratic.QuadraticModel.gram`)."""
        return self.quadratic.gram(self._forwards, vectors)

    # --- the step -----------------------------------------------------------------------------
    def _closure_loss(self, closure: Callable[[], Any] | None) -> tuple[Any, list[Forward]]:
        """Run the closure (if any); the loss it returns and the forwards recorded since the last step."""
        if closure is None and self.adapt_damping and self.loss_fn is None:
            raise ValueError("closure: adapt_damping=True needs step(closure) to measure the loss at the new "
                             "point, or loss_fn to read it from re-run forwards (Hugging Face Trainer: "
                             "cgfac.integrations.transformers.causal_lm_loss), or adapt_damping=False")
        loss = None
        if closure is not None:
            self.recorder.forwards = []
            with torch.enable_grad():
                loss = closure()
            if loss is None:
                raise ValueError("closure must return the loss")
        forwards, self.recorder.forwards = self.recorder.forwards, []
        return loss, forwards

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update. ``closure`` (zero the gradients, forward, backward, return the loss) is
        required for adaptive damping; without it, a forward and backward must have run."""
        loss, forwards = self._closure_loss(closure)
        h0 = loss
        if self.loss_fn is not None:  # h(θ) and the damping check's h(θ + δ) both from loss_fn, forward only
            recorded = self.recorder.recorded_loss(forwards)
            if recorded is None and closure is None and self.adapt_damping:
                raise ValueError("loss_fn: no forward of the model was recorded since the last step (a training "
                                 "forward with grad enabled must run before step())")
            if recorded is not None:
                h0, closure = recorded, lambda: self.recorder.replay_loss(forwards)
                if loss is None:
                    loss = recorded
        pre = self.preconditioner
        if pre.fisher == "true" and forwards and self.recorder.subset_sampling(forwards[0].args):
            self.recorder.sample_subset(forwards)
        grads = regularised_grads(self.param_groups)
        pre.damping.value = self.damping
        pre.damping_offset = self._max_weight_decay()
        skipped = pre.skipped_steps
        pre.step()
        if pre.skipped_steps != skipped or not grads:
            self.skipped_steps += 1
            self.schedule.reset()
            return loss
        self._forwards = forwards
        try:
            self._update(grads, h0, closure)
        finally:
            self._forwards = []
        self.steps += 1
        return loss

    def _max_weight_decay(self) -> float:
        return max((g["weight_decay"] for g in self.param_groups), default=0.0)

    def _update(self, grads: dict[Tensor, Tensor], loss: Any, closure: Callable[[], Any] | None) -> None:
        params = list(grads)
        delta = {p: -_grad(p) for p in params}  # Δ = −(C̃ + λI)⁻¹ ∇h
        prev = {p: self.state[p].get("prev_update") for p in params}
        has_prev = all(v is not None for v in prev.values()) and self.steps > 0
        info: dict[str, float] = {"damping": self.damping}
        lr = {p: g["lr"] for g in self.param_groups for p in g["params"]}
        mom = {p: g["momentum"] for g in self.param_groups for p in g["params"]}
        found = self._model_coefficients(grads, delta, prev, has_prev, lr, mom, info)
        if found is None:
            self.schedule.reset()
            self.skipped_steps += 1
            self.damping = self.rule.raised(self.damping)
            warnings.warn("cgfac: the quadratic model gave no finite step; step skipped, damping raised",
                          RuntimeWarning, stacklevel=3)
            for p in params:
                _grad(p).copy_(grads[p])
            return
        coeffs, quad_change = found
        updates = self._updates(params, delta, prev, coeffs, lr, mom)
        if updates is None:
            self.schedule.reset()
            return
        for p in params:
            p.add_(updates[p])
            self.state[p]["prev_update"] = updates[p]
            _grad(p).copy_(grads[p])
        if self.adapt_damping and closure is not None and self.rule.due(self.steps):
            with record_function("cgfac.optim.damping_check"):
                info.update(self._adapt_damping(float(loss), quad_change, closure, updates))
            for p in params:  # the evaluation's gradients are discarded: .grad is ∇h at θ again
                if p.grad is None:
                    p.grad = grads[p].clone()
                else:
                    p.grad.copy_(grads[p])
        self.last = info

    def _model_coefficients(self, grads: dict[Tensor, Tensor], delta: dict[Tensor, Tensor],
                            prev: dict[Tensor, Any], has_prev: bool, lr: dict[Tensor, float],
                            mom: dict[Tensor, float], info: dict[str, float]
                            ) -> tuple[tuple[float, float], float | None] | None:
        """``(α, μ)`` and the model's change of the update applied (None: not evaluated), or None: no
        finite step. The model is evaluated where the schedule says so (:class:`ModelSchedule`);
        otherwise the last ``(α, μ)`` (no damping check is due then). ``lr``, ``mom``: per parameter."""
        if self.adaptive == "none":
            return (1.0, 1.0), None
        if not self.schedule.due(self.steps, self.adapt_damping and self.rule.due(self.steps)):
            coeffs = self.schedule.coeffs
            assert coeffs is not None  # due() otherwise
            info.update(alpha=coeffs[0], mu=coeffs[1] if has_prev else 0.0, model_reused=1.0)
            return coeffs, None
        first = next(iter(grads))
        found = fit_coefficients(
            self._curvature_gram, [delta] + ([prev] if has_prev else []), self._names, grads,
            param_damping(self.preconditioner), self.damping + self._max_weight_decay(), self._max_weight_decay(),
            self.adaptive, mom[first], lr[first], info)
        if found is not None:
            self.schedule.record(self.steps, found[0])
        return found

    def _updates(self, params: list[Tensor], delta: dict[Tensor, Tensor], prev: dict[Tensor, Any],
                 coeffs: tuple[float, float], lr: dict[Tensor, float],
                 mom: dict[Tensor, float]) -> dict[Tensor, Tensor] | None:
        """The update ``δ = lr α Δ + μ δ₀`` of each parameter; None (step skipped) if not finite."""
        updates = {}
        for p in params:
            u = delta[p].mul(lr[p] * coeffs[0])
            if prev[p] is not None and self.steps > 0:
                u.add_(prev[p], alpha=coeffs[1] * (mom[p] if self.adaptive == "none" else 1.0))
            updates[p] = u
        if not bool(torch.stack([u.sum() for u in updates.values()]).sum().isfinite()):  # one read, one pass
            self.skipped_steps += 1
            warnings.warn("cgfac: non-finite update; step skipped", RuntimeWarning, stacklevel=4)
            return None
        return updates

    def _adapt_damping(self, loss: float, quad_change: float | None, closure: Callable[[], Any],
                       updates: dict[Tensor, Tensor]) -> dict[str, float]:
        new_loss = evaluation_loss(self.model, self.recorder, self.preconditioner, closure) + l2_term(self.param_groups)
        old_loss = loss + l2_term(self.param_groups, undo=updates)
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
        rho = self.rule.ratio(new_loss, old_loss, quad_change)
        adapted = self.rule.adapted(self.damping, rho)
        if rejected or abs(math.log(adapted / self.damping)) > math.log1p(self.schedule.tolerance):
            self.schedule.reset()  # the reused coefficients belonged to the old point, or to a λ far from it
        self.damping = adapted
        return {"rho": rho, "new_loss": new_loss, "damping_next": self.damping, "rejected": float(rejected)}

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state (per-parameter previous updates, param groups), the adapted
        damping and counters, and the preconditioner's own state."""
        state = super().state_dict()
        state["cgfac"] = {"damping": self.damping, "steps": self.steps, "skipped_steps": self.skipped_steps,
                          "rejected_steps": self.rejected_steps, "model_schedule": self.schedule.state(),
                          "preconditioner": self.preconditioner.state_dict()}
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
        if "model_schedule" in ours:
            self.schedule.load(ours["model_schedule"])

    def remove(self) -> None:
        """Remove every hook (the optimizer's and the preconditioner's)."""
        self.recorder.remove()
        self.preconditioner.remove()
