"""Checkpointing plumbing of a preconditioner: :func:`state_dict` and :func:`load_state_dict`.

The format (unchanged since the first checkpoints): ``type``, ``world_size``, ``rank``, ``full``,
``steps``, ``fallbacks``, ``skipped_steps``, ``hyperparameters`` (every non-callable
:class:`cgfac.config.HyperParam` of :meth:`Checkpointed.hyperparameters` by name), ``generator``
and ``generators`` (the true Fisher's random streams), and ``layers``: per block its
:class:`cgfac.precondition.state.LayerState` entry with every direction stage's per-layer state merged in (the
graft's ``graft_v``, ``graft_steps``). Subclasses add their own keys (CG-FAC: ``cost_constants``).
:func:`cgfac.checkpoint.full_state_dict` assembles the states of every rank. The functions read
and write only what :class:`Checkpointed` declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor

from cgfac.config import HyperParam
from cgfac.distributed.collectives import WorkAssignment
from cgfac.layers import LayerHelper
from cgfac.precondition.state import LayerState
from cgfac.precondition.transforms import DirectionStage

__all__ = ["Checkpointed", "check_loadable", "load_state_dict", "state_dict"]


class Generators(Protocol):
    def generator_state(self) -> tuple[Tensor, dict[str, Tensor]]: ...

    def load_generator_state(self, generator: Tensor, streams: Mapping[str, Tensor]) -> None: ...


class Checkpointed(Protocol):
    """What a checkpoint reads and restores of a preconditioner (:class:`cgfac.precondition.base.Preconditioner`)."""

    steps: int
    fallbacks: int
    skipped_steps: int

    @property
    def dist(self) -> WorkAssignment: ...

    @property
    def layers(self) -> dict[str, LayerHelper]: ...

    @property
    def states(self) -> dict[str, LayerState]: ...

    @property
    def stages(self) -> list[DirectionStage]: ...

    @property
    def capture(self) -> Generators: ...

    def hyperparameters(self) -> dict[str, HyperParam]: ...


def state_dict(pre: Checkpointed) -> dict[str, Any]:
    """See :meth:`cgfac.precondition.base.Preconditioner.state_dict`."""
    staged: dict[str, dict[str, Any]] = {}
    for stage in pre.stages:
        for name, entry in stage.state_dict().items():
            staged.setdefault(name, {}).update(entry)
    generator, streams = pre.capture.generator_state()
    return {
        "type": type(pre).__name__,
        "world_size": pre.dist.world,
        "rank": pre.dist.rank,
        "full": not pre.dist.active,
        "steps": pre.steps,
        "fallbacks": pre.fallbacks,
        "skipped_steps": pre.skipped_steps,
        "hyperparameters": {k: v.value for k, v in pre.hyperparameters().items() if not callable(v.value)},
        "generator": generator,
        "generators": streams,
        "layers": {name: {**pre.states[name].state_dict(), **staged.get(name, {})} for name in pre.layers},
    }


def check_loadable(pre: Checkpointed, state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a state of this preconditioner's class and model
    that loads on this rank and number of processes."""
    if not isinstance(state, dict) or "layers" not in state:
        raise ValueError("state_dict: not a cgfac preconditioner state")
    if state.get("type") != type(pre).__name__:
        raise ValueError(f"state_dict: saved from {state.get('type')}, loading into {type(pre).__name__}")
    saved_world, dist = state.get("world_size", 1), pre.dist
    if not state.get("full", True) and (saved_world != dist.world or state.get("rank") != dist.rank):
        raise ValueError(
            f"state_dict: rank {state.get('rank')}'s own state of {saved_world} processes cannot be loaded on rank "
            f"{dist.rank} of {dist.world} (its layers' curvature lives on their owners); save "
            "cgfac.checkpoint.full_state_dict(pre) instead, which loads on any number of processes")
    mine = {name: (h.d_out, h.d_in) for name, h in pre.layers.items()}
    theirs = {name: tuple(layer["shape"]) for name, layer in state["layers"].items()}
    if mine != theirs:
        diff = sorted(f"{n}: saved {theirs.get(n)}, model {mine.get(n)}"
                      for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
        raise ValueError("state_dict: saved for a different model: " + "; ".join(diff))


def load_state_dict(pre: Checkpointed, state: dict[str, Any]) -> None:
    """See :meth:`cgfac.precondition.base.Preconditioner.load_state_dict`."""
    check_loadable(pre, state)
    hyper = pre.hyperparameters()
    for key, value in state["hyperparameters"].items():
        param = hyper[key]
        if not callable(param.value):
            param.value = value
            param(pre.steps)  # re-checks bounds
    pre.steps = state["steps"]
    pre.fallbacks = state["fallbacks"]
    pre.skipped_steps = state["skipped_steps"]
    generators = state["generators"]
    per_rank = state.get("rank_generators")
    if per_rank is not None:
        generators = per_rank[pre.dist.rank] if len(per_rank) == pre.dist.world else {}
    elif state.get("world_size", 1) != pre.dist.world:
        generators = {}
    pre.capture.load_generator_state(state["generator"], generators)
    layers = {name: state["layers"][name] for name in pre.layers}
    for name, entry in layers.items():
        pre.states[name].load_state_dict(entry)
    devices = {name: helper.device for name, helper in pre.layers.items()}
    for stage in pre.stages:
        stage.load_state_dict(layers, devices)
