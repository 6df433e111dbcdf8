"""cgfac: CG-FAC (matrix-free K-FAC by conjugate gradients) and standard K-FAC for PyTorch.

* :class:`cgfac.CGFAC`, :class:`cgfac.KFAC`: preconditioners for any ``torch.optim`` optimizer
  (``loss.backward(); pre.step(); opt.step()``).
* :class:`cgfac.optim.CGFAC`, :class:`cgfac.optim.KFAC`: optimizers that own the update
  (quadratic-model step and momentum, Levenberg–Marquardt damping; ``opt.step(closure)``).
"""

from cgfac import checkpoint, optim
from cgfac.base import Preconditioner, ReportEntry
from cgfac.cgfac import CGFAC
from cgfac.kfac import KFAC
from cgfac.layers import LayerGroup, LayerHelper, register_layer_helper

__all__ = [
    "CGFAC", "KFAC", "LayerGroup", "LayerHelper", "Preconditioner", "ReportEntry", "checkpoint", "optim",
    "register_layer_helper",
]
__version__ = "0.1.0"
