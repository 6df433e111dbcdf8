"""Compatibility path of :mod:`cgfac.curvature.exact` (the exact empirical-Fisher block)."""

from cgfac.curvature.exact import ExactRows

__all__ = ["ExactRows"]
