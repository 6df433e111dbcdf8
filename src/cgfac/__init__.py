"""cgfac: CG-FAC (matrix-free K-FAC by conjugate gradients) and standard K-FAC for PyTorch."""

from cgfac.base import Preconditioner, ReportEntry
from cgfac.cgfac import CGFAC
from cgfac.kfac import KFAC

__all__ = ["CGFAC", "KFAC", "Preconditioner", "ReportEntry"]
__version__ = "0.1.0"
