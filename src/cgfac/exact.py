"""Deprecated path of :mod:`cgfac.curvature.exact` (the exact empirical-Fisher block); warns on import."""

import warnings

from cgfac.curvature.exact import ExactRows

__all__ = ["ExactRows"]

warnings.warn("cgfac.exact is deprecated: import ExactRows from cgfac.curvature.exact (or cgfac.curvature)",
              DeprecationWarning, stacklevel=2)
