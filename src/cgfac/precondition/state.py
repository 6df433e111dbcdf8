"""Per-layer state in one place: what a preconditioner keeps for each block between steps.

A :class:`LayerState` holds the block's helper (how its module becomes rows and a gradient
matrix), its curvature state (CG-FAC: a :class:`~cgfac.curvature.RowWindow` of recent rows; K-FAC:
:class:`~cgfac.curvature.RunningFactors`), its :class:`~cgfac.solvers.SolverState` (warm start,
CG counts, probes, a kept decomposition) and the statistics of its last step. A preconditioner
holds ``dict[name, LayerState]`` and checkpoints through :meth:`LayerState.state_dict` (with the
direction stages' per-layer state merged in, :mod:`cgfac.precondition.persist`; the graft's second moment is
:class:`cgfac.precondition.transforms.Graft`'s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import torch
from torch import Tensor

from cgfac.curvature import RowWindow, RunningFactors
from cgfac.layers import LayerHelper
from cgfac.solvers import Decomposition, SolverState


@dataclass
class LayerState:
    """One block's state (see the module docstring); ``stats`` is None before its first step.
    ``rebuild``: how a saved decomposition's tensors become one again (K-FAC: the block's
    :class:`cgfac.solvers.FactorKind`; None: a saved one is not restored)."""

    helper: LayerHelper | None
    curvature: RowWindow | RunningFactors | None = None
    solver: SolverState = field(default_factory=SolverState)
    stats: dict[str, Any] | None = None
    rebuild: Callable[[Sequence[Tensor]], Decomposition] | None = None

    def state_dict(self) -> dict[str, Any]:
        """``shape`` (``(d_out, d_in)``, checked on load), the curvature's state (``window``, or
        ``factors``/``factor_updates``) and the solver's (``solution``, ``last_iters``,
        ``iters_damping``, ``probed_at``, ``eigen``/``eigen_age``), tensors referenced."""
        state: dict[str, Any] = {}
        if self.helper is not None:
            state["shape"] = (self.helper.d_out, self.helper.d_in)
        if isinstance(self.curvature, RowWindow):
            state["window"] = self.curvature.state_dict()
        elif isinstance(self.curvature, RunningFactors):
            state.update(self.curvature.state_dict())
        state.update(self.solver.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto the helper's device (tensors copied)."""
        device = self.helper.device if self.helper is not None else torch.device("cpu")
        if isinstance(self.curvature, RowWindow):
            self.curvature.load_state_dict(state["window"], device)
        elif isinstance(self.curvature, RunningFactors):
            self.curvature.load_state_dict(state, device)
        self.solver.load_state_dict(state, device, self.rebuild)


class StateView(MutableMapping[str, Any]):
    """A dict-like view of one field of every layer's state: ``view[name]`` reads
    ``get(states[name])``; a field that is None counts as absent. Writing a name without a state
    creates one (helper None), as solving a block by name does."""

    def __init__(self, states: Callable[[], dict[str, LayerState]], get: Callable[[LayerState], Any],
                 put: Callable[[LayerState, Any], None] | None = None) -> None:
        self._states, self._get, self._put = states, get, put

    def __getitem__(self, name: str) -> Any:
        state = self._states().get(name)
        value = None if state is None else self._get(state)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        if self._put is None:
            raise TypeError("this view is read-only")
        states = self._states()
        if name not in states:
            states[name] = LayerState(None)
        self._put(states[name], value)

    def assign(self, value: Mapping[str, Any]) -> None:
        """Every layer's field replaced: ``value``'s where it has the name (a state made for a new name), else None."""
        if self._put is None:
            raise TypeError("this view is read-only")
        for state in self._states().values():
            self._put(state, None)
        for name, v in value.items():
            self[name] = v

    def __delitem__(self, name: str) -> None:
        self[name]
        self.__setitem__(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, state in self._states().items() if self._get(state) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class HasStates(Protocol):
    """What holds per-layer states: a preconditioner."""

    states: dict[str, LayerState]


class StatsField:
    """The ``stats`` attribute of a holder of ``states``: ``holder.stats`` is a :class:`StateView` of each
    :attr:`LayerState.stats`, and assigning a mapping to it replaces every layer's (:meth:`StateView.assign`)."""

    @overload
    def __get__(self, holder: None, owner: type) -> StatsField: ...

    @overload
    def __get__(self, holder: HasStates, owner: type) -> StateView: ...

    def __get__(self, holder: HasStates | None, owner: type) -> StatsField | StateView:
        if holder is None:
            return self
        return StateView(lambda: holder.states, lambda s: s.stats, lambda s, v: setattr(s, "stats", v))

    def __set__(self, holder: HasStates, value: Mapping[str, dict[str, Any]]) -> None:
        self.__get__(holder, type(holder)).assign(value)


def solver_field(states: Callable[[], dict[str, LayerState]], name: str) -> StateView:
    """A view of one :class:`SolverState` field across layers (``pre.solutions``, ``pre.last_iters``, ...)."""
    return StateView(states, lambda s: getattr(s.solver, name), lambda s, v: setattr(s.solver, name, v))
