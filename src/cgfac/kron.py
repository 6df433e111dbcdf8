"""Compatibility path of :mod:`cgfac.curvature.kron` (the Kronecker-factored curvature)."""

from cgfac.curvature.kron import DAMPING_FORMS, KronEigen, KronFactors, KronRows, eigh, factor_eig, factored_damping

__all__ = ["DAMPING_FORMS", "KronEigen", "KronFactors", "KronRows", "eigh", "factor_eig", "factored_damping"]
