"""Deprecated path of :mod:`cgfac.solvers.pcg` (preconditioned conjugate gradients on matrices).

Import ``CGResult`` and ``cg`` from :mod:`cgfac.solvers.pcg` instead; this module warns on import.
"""

import warnings

from cgfac.solvers.pcg import CGResult, cg

__all__ = ["CGResult", "cg"]

warnings.warn("cgfac.cg is deprecated: import CGResult and cg from cgfac.solvers.pcg", DeprecationWarning,
              stacklevel=2)
