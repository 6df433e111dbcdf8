"""The cost model's old path: :mod:`cgfac.solvers.cost` under its former name.

``cgfac.cost`` *is* the module ``cgfac.solvers.cost`` (one module object in ``sys.modules``), so
reading, and patching, either name reaches the same functions.
"""

import sys

from cgfac.solvers import cost as _cost
from cgfac.solvers.cost import (
    CostConstants,
    calibrate,
    candidates,
    choose,
    exact_costs,
    kron_costs,
    predicted_costs,
)

__all__ = ["CostConstants", "calibrate", "candidates", "choose", "exact_costs", "kron_costs", "predicted_costs"]

sys.modules[__name__] = _cost
