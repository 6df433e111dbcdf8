"""cgfac: CG-FAC (matrix-free K-FAC by conjugate gradients) and standard K-FAC for PyTorch."""

from cgfac.base import Preconditioner, ReportEntry
from cgfac.cgfac import CGFAC
from cgfac.kfac import KFAC
from cgfac.layers import LayerGroup, LayerHelper, register_layer_helper

__all__ = ["CGFAC", "KFAC", "LayerGroup", "LayerHelper", "Preconditioner", "ReportEntry", "register_layer_helper"]
__version__ = "0.1.0"
