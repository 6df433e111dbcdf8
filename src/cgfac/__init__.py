"""cgfac: CG-FAC (matrix-free K-FAC by conjugate gradients) and standard K-FAC for PyTorch.

* :class:`cgfac.CGFAC`, :class:`cgfac.KFAC`: preconditioners for any ``torch.optim`` optimizer
  (``loss.backward(); pre.step(); opt.step()``).
* :class:`cgfac.optim.CGFAC`, :class:`cgfac.optim.KFAC`: optimizers that own the update
  (quadratic-model step and momentum, Levenberg–Marquardt damping; ``opt.step(closure)``).
* :mod:`cgfac.solvers` (``Solver``, ``register_solver``, CG / low-rank / eigen / auto),
  :mod:`cgfac.curvature` (the ``Curvature`` protocol, Kronecker rows and factors, exact rows),
  :class:`cgfac.LayerState` (one block's helper, curvature, solver state and statistics):
  the pieces a preconditioner strings together, re-exported here.
"""

from cgfac import checkpoint, curvature, optim, solvers
from cgfac.base import Preconditioner, ReportEntry
from cgfac.cgfac import CGFAC
from cgfac.curvature import Curvature, DirectCurvature, ExactRows, KronFactors, KronRows
from cgfac.kfac import KFAC
from cgfac.layers import LayerGroup, LayerHelper, register_layer_helper
from cgfac.solvers import Solver, register_solver
from cgfac.state import LayerState

__all__ = [
    "CGFAC", "KFAC", "Curvature", "DirectCurvature", "ExactRows", "KronFactors", "KronRows", "LayerGroup",
    "LayerHelper", "LayerState", "Preconditioner", "ReportEntry", "Solver", "checkpoint", "curvature", "optim",
    "register_layer_helper", "register_solver", "solvers",
]
__version__ = "0.1.0"
