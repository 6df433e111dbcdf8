"""CG-FAC's curvature state: the rows of the last few batches, weighted like a running average.

A window keeps the :class:`~cgfac.layers.Rows` of the last ``size`` batches (oldest first). Its
curvature is the weighted sum over the batches, with K-FAC's running-average weights
``w_j ∝ (1 − ρ) ρ^j`` for the batch ``j`` steps ago (``ρ = factor_decay``), renormalised to sum to
one (a single batch has weight 1). The layer's helper turns the window into an operator
(:meth:`cgfac.layers.LayerHelper.operator`): rows are stacked, never multiplied out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from cgfac.rows import Rows


def window_weights(count: int, rho: float) -> list[float]:
    """Running-average weights, oldest first: ``(1 − ρ) ρ^j`` for the batch ``j`` steps ago, normalised."""
    raw = [1.0] if count == 1 else [(1 - rho) * rho**j if rho < 1 else 1.0 for j in range(count)]
    total = sum(raw) or 1.0
    return [w / total for w in reversed(raw)]


class RowWindow:
    """The rows of the last ``size`` batches of one layer (a bounded deque, oldest first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: deque[Rows] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Rows]:
        return iter(self.batches)

    def __bool__(self) -> bool:
        return bool(self.batches)

    def append(self, rows: Rows) -> None:
        self.batches.append(rows)

    def clear(self) -> None:
        self.batches.clear()

    def weights(self, rho: float) -> list[float]:
        return window_weights(len(self.batches), rho)

    @property
    def num_rows(self) -> int:
        return sum(int(r.a.shape[0]) for r in self.batches)

    def state_dict(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """``[(a, g, n), ...]`` oldest first; tensors are referenced, as in ``torch.optim``."""
        return [(r.a, r.g, r.n) for r in self.batches]

    def load_state_dict(self, state: list[Any], device: torch.device) -> None:
        """Restore the newest ``size`` batches of a :meth:`state_dict` (copied onto ``device``)."""
        from cgfac.rows import Rows

        self.batches.clear()
        for a, g, n in state[-self.size:]:
            self.batches.append(Rows(a.to(device).clone(), g.to(device).clone(), n))
