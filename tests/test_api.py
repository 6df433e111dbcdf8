"""The package root: the public surface re-exported from ``cgfac``."""

from __future__ import annotations


def test_public_surface_is_re_exported() -> None:
    """The pieces a preconditioner strings together are reachable from the package root."""
    import cgfac.curvature
    import cgfac.precondition.state
    import cgfac.solvers

    assert cgfac.Solver is cgfac.solvers.Solver and cgfac.register_solver is cgfac.solvers.register_solver
    assert cgfac.LayerState is cgfac.precondition.state.LayerState
    assert cgfac.Curvature is cgfac.curvature.Curvature and cgfac.KronRows is cgfac.curvature.KronRows
    assert all(hasattr(cgfac, name) for name in cgfac.__all__)
