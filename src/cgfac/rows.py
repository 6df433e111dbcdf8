"""Curvature rows: the data a layer's curvature is built from (no dependency on layers or solvers)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Rows"]


@dataclass
class Rows:
    """Curvature rows of one layer: ``a`` (``r × d_in``), ``g`` (``r × d_out``), ``n`` samples."""

    a: Tensor
    g: Tensor
    n: int

    @property
    def rows_per_sample(self) -> int:
        return self.a.shape[0] // self.n
