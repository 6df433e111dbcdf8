"""A layer's damped curvature: the declared interface and its implementations.

* :mod:`~cgfac.curvature.base`: :class:`Curvature` (products ``C V + λV``, the Jacobi diagonal,
  rows and samples, optional explicit factors) and :class:`DirectCurvature` (closed-form blocks).
* :mod:`~cgfac.curvature.kron`: Kronecker rows (:class:`KronRows`, CG-FAC's), explicit factors
  (:class:`KronFactors`) and their eigendecomposition (:class:`KronEigen`); factored damping.
* :mod:`~cgfac.curvature.exact`: the exact empirical-Fisher block (:class:`ExactRows`).
* :mod:`~cgfac.curvature.window`: CG-FAC's window of recent batches' rows (:class:`RowWindow`).
* :mod:`~cgfac.curvature.running`: K-FAC's running-average factors (:class:`RunningFactors`).
"""

from cgfac.curvature.base import Curvature, DeviceTraced, DirectCurvature, RankBounded, Scaled
from cgfac.curvature.exact import ExactRows
from cgfac.curvature.kron import (
    DAMPING_FORMS,
    KronEigen,
    KronFactors,
    KronRows,
    eigh,
    factor_basis,
    factor_eig,
    factored_damping,
    factored_damping_tensor,
)
from cgfac.curvature.running import RunningFactors
from cgfac.curvature.window import RowWindow, window_weights

__all__ = [
    "DAMPING_FORMS", "Curvature", "DeviceTraced", "DirectCurvature", "ExactRows", "KronEigen", "KronFactors",
    "KronRows", "RankBounded", "RowWindow", "RunningFactors", "Scaled", "eigh", "factor_basis",
    "factor_eig", "factored_damping", "factored_damping_tensor", "window_weights",
]
