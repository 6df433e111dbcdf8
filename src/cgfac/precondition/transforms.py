"""The stages a step's directions pass through between the solves and the ``.grad`` writes.

One step's working data is a :class:`StepData`; each stage (:class:`DirectionStage`) is a small
object with its own per-layer state (``state_dict``/``load_state_dict``, saved inside each layer's
checkpoint entry) that reads and changes it. :attr:`cgfac.precondition.base.Preconditioner.stages` lists them;
:meth:`cgfac.precondition.base.Preconditioner.step` applies each at its ``phase``, in list order:

* ``"held"``: after the solves and the sharing of directions, before they are scattered, on the
  ranks that hold ``∇W``. :class:`Graft` (``graft="rmsprop"``): each direction takes the length of
  RMSProp's step (:mod:`cgfac.precondition.graft`).
* ``"final"``: once each rank has what it writes (``step.final``, with ``⟨X, ∇W⟩``).
  :class:`KLClip` (``kl_clip=κ``): the scale ``ν = min(1, √(κ / |lr² Σ_layers ⟨X, ∇W⟩|))`` of every
  direction (Ba et al. 2017; kfac-pytorch).
* ``"written"``: after the ``.grad`` writes. :class:`VanishingCheck`: records (and warns once)
  when settings make the step vanish.

A new stage is one class here with those four members, appended to ``stages``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from cgfac.config import HyperParam
from cgfac.layers import LayerHelper
from cgfac.precondition.graft import RMSPropGraft

__all__ = ["DAMPING_SWAMPS", "VANISHING_KL_SCALE", "DirectionStage", "Graft", "KLClip", "Phase", "StepData",
           "VanishingCheck"]

VANISHING_KL_SCALE = 1e-3  # a KL clip scaling the step by less than this makes it vanish
DAMPING_SWAMPS = 1e3  # damping above this multiple of the largest curvature eigenvalue swamps it


@dataclass
class StepData:
    """One step's working data, passed from stage to stage."""

    damping: float  # λ of this step
    steps: int  # the step number (for schedules)
    stats: MutableMapping[str, dict[str, Any]]  # per-layer statistics of this step
    active: dict[str, tuple[LayerHelper, Tensor]] = field(default_factory=dict)  # helper, ∇W (compute dtype)
    directions: dict[str, Tensor | None] = field(default_factory=dict)  # the solves' X (None: plain gradient)
    holds: Callable[[str], bool] = lambda name: True  # whether this rank holds the layer's ∇W and X
    final: dict[str, tuple[Any, float]] = field(default_factory=dict)  # X (or this rank's rows), ⟨X, ∇W⟩
    scale: float = 1.0  # the KL clip's ν
    undo: list[str] = field(default_factory=list)  # layers whose rows of this step are forgotten


Phase = Literal["held", "final", "written"]


class DirectionStage(Protocol):
    """A stage of :class:`StepData`'s directions, applied at its ``phase`` (module docstring).
    ``state_dict()``: ``{layer: {key: value}}``, merged into each layer's checkpoint entry;
    ``load_state_dict`` receives every layer's entry and the device of each layer."""

    phase: Phase

    def apply(self, step: StepData) -> None: ...

    def state_dict(self) -> dict[str, dict[str, Any]]: ...

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None: ...


class Graft:
    """``graft="rmsprop"``: each held block's second moment takes this gradient, and its direction
    (where it has one) is rescaled in place to RMSProp's step length. Every rank holds the same
    (all-reduced) gradients and directions of whole-matrix layers and computes the same; a layer
    under the owner scheme is grafted on its owner alone (the only holder of its ∇W), before the
    direction is scattered, and its second moment lives there. ``state_dict()``:
    ``{layer: {"graft_v", "graft_steps"}}``, saved inside each layer's checkpoint entry."""

    phase: Phase = "held"

    def __init__(self, kind: str, beta2: float, eps: float) -> None:
        self.enabled = kind == "rmsprop"
        self.beta2, self.eps = beta2, eps
        self.moments: dict[str, RMSPropGraft] = {}

    def apply(self, step: StepData) -> None:
        if not self.enabled:
            return
        for name, (_, grad) in step.active.items():
            if not step.holds(name):
                continue
            moment = self.moments.get(name)
            if moment is None or moment.v.shape != grad.shape:
                moment = self.moments[name] = RMSPropGraft.like(grad)
            moment.update(grad.to(moment.v.dtype), self.beta2)
            x = step.directions.get(name)
            if x is not None:  # a 0-dim tensor: layer_stats() reads it
                step.stats[name]["graft_scale"] = moment.apply(x, grad.to(x.dtype), self.beta2, self.eps)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: moment.state_dict() for name, moment in self.moments.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None:
        """Each layer's entry (``graft_v``, ``graft_steps``; a layer without them has no moment yet)."""
        for name, entry in state.items():
            self.moments.pop(name, None)
            if "graft_v" in entry:
                device = (devices or {}).get(name, torch.device("cpu"))
                self.moments[name] = RMSPropGraft.from_state(dict(entry), device)


class KLClip:
    """``ν = min(1, √(κ / |lr² Σ_layers ⟨X, ∇W⟩|))`` from each final layer's ``⟨X, ∇W⟩`` (layer
    order); 1 without ``kl_clip``. The hyperparameters are the preconditioner's own objects."""

    phase: Phase = "final"

    def __init__(self, kl_clip: HyperParam | None, lr: HyperParam) -> None:
        self.kl_clip, self.lr = kl_clip, lr

    @property
    def enabled(self) -> bool:
        return self.kl_clip is not None

    def scale(self, products: list[float], steps: int) -> float:
        if self.kl_clip is None or not products:
            return 1.0
        vg = sum(products) * self.lr(steps) ** 2
        if vg == 0 or vg != vg:
            return 1.0
        return min(1.0, (self.kl_clip(steps) / abs(vg)) ** 0.5)

    def apply(self, step: StepData) -> None:
        step.scale = self.scale([product for _, product in step.final.values()], step.steps)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {}  # κ and lr are saved with the preconditioner's hyperparameters

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None:
        pass


class VanishingCheck:
    """Report settings that make the step vanish: the KL clip's ``ν`` below
    ``VANISHING_KL_SCALE``, or ``λ`` above ``DAMPING_SWAMPS`` × a bound on the largest curvature
    eigenvalue (``curvature_bound`` in the layer's stats, e.g. ``tr(A)·tr(G)``). Recorded in
    ``layer_stats()`` (``"step_vanishes"``) every step; warned once per preconditioner."""

    phase: Phase = "written"

    def __init__(self, kl_clip: HyperParam | None) -> None:
        self.kl_clip = kl_clip
        self.warned = False

    def apply(self, step: StepData) -> None:
        final, scale, stats = list(step.final), step.scale, step.stats
        problems = []
        if self.kl_clip is not None:
            for name in final:
                stats[name]["kl_scale"] = scale
            if scale < VANISHING_KL_SCALE:
                note = (f"the KL clip scales the step by nu={scale:.3g} < {VANISHING_KL_SCALE:g}: "
                        f"raise kl_clip (now {self.kl_clip(step.steps):.3g}) or set kl_clip=None")
                for name in final:
                    stats[name]["step_vanishes"] = note
                problems.append(note)
        swamped = []
        for name in final:
            bound = stats[name].get("curvature_bound")
            lam = stats[name].get("damping", step.damping)
            if bound is not None and lam > DAMPING_SWAMPS * bound:
                note = (f"damping={lam:.3g} > {DAMPING_SWAMPS:g} x the layer's largest curvature eigenvalue "
                        f"(at most {bound:.3g}): the direction is about grad/damping; lower damping")
                st = stats[name]
                st["step_vanishes"] = f"{st['step_vanishes']}; {note}" if "step_vanishes" in st else note
                swamped.append(name)
        if swamped:
            problems.append(f"damping={step.damping:.3g} swamps the curvature of layer(s) "
                            f"{', '.join(repr(n) for n in swamped)} (> {DAMPING_SWAMPS:g} x a bound on their "
                            "largest eigenvalue, tr(A)·tr(G)): the step is about grad/damping; lower damping")
        if problems and not self.warned:
            self.warned = True
            warnings.warn(
                "cgfac: the step vanishes: " + "; ".join(problems) + ". Units: G is built here from per-sample "
                "gradients (n x the mean loss's output gradients), so kfac-pytorch's damping and kl_clip "
                "correspond to damping·n² and kl_clip·n² here (n: the batch size). Reported once; see "
                "layer_stats()[name]['step_vanishes'].", RuntimeWarning, stacklevel=4)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {}  # the once-only warning is not part of a checkpoint

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None:
        pass
