"""Which solver a ``solver=`` name means: a registry of :class:`~cgfac.solvers.base.Solver` classes.

Adding a solver is one module with a :class:`Solver` subclass and one line,
``register_solver(MySolver)``; ``CGFAC(solver=MySolver.name)`` then uses it, and with
``auto_candidate = True`` (and cost formulas) ``solver="auto"`` weighs it too. Registration order
breaks cost ties (the first registered wins).
"""

from __future__ import annotations

from typing import TypeVar

from cgfac.solvers.base import Solver, SolverSettings

_REGISTRY: dict[str, type[Solver]] = {}
S = TypeVar("S", bound=type[Solver])


def register_solver(solver_class: S) -> S:
    """Make ``solver_class`` available as ``solver=solver_class.name`` (replacing a previous
    registration of that name). Returns the class, so it works as a decorator."""
    if not (isinstance(solver_class, type) and issubclass(solver_class, Solver)):
        raise TypeError(f"register_solver needs a subclass of cgfac.solvers.Solver, got {solver_class!r}")
    name = getattr(solver_class, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{solver_class.__name__}.name must be a non-empty string")
    _REGISTRY[name] = solver_class
    return solver_class


def unregister_solver(name: str) -> None:
    """Remove a registered solver (e.g. a test's)."""
    _REGISTRY.pop(name, None)


def solver_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_REGISTRY)


def solver_class(name: str) -> type[Solver]:
    """The class registered as ``name``; ``ValueError`` listing the names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"solver must be one of {solver_names()}, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"solver must be one of {solver_names()}, got {name!r}")
    return _REGISTRY[name]


def make_solver(name: str, settings: SolverSettings | None = None) -> Solver:
    """An instance of the solver registered as ``name``, configured by ``settings``."""
    return solver_class(name).from_settings(settings or SolverSettings())


def candidates(kind: str) -> list[type[Solver]]:
    """The automatic choice's candidates for a curvature kind, in registration order."""
    return [cls for cls in _REGISTRY.values() if cls.auto_candidate and kind in cls.kinds]
