"""Deprecated path of :mod:`cgfac.curvature.kron` (the Kronecker-factored curvature); warns on import."""

import warnings

from cgfac.curvature.kron import DAMPING_FORMS, KronEigen, KronFactors, KronRows, eigh, factor_eig, factored_damping

__all__ = ["DAMPING_FORMS", "KronEigen", "KronFactors", "KronRows", "eigh", "factor_eig", "factored_damping"]

warnings.warn("cgfac.kron is deprecated: import from cgfac.curvature.kron (or cgfac.curvature)", DeprecationWarning,
              stacklevel=2)
