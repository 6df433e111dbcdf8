"""The exact empirical-Fisher block of one layer, matrix-free.

Sample ``s`` owns rows ``t ∈ s`` of ``a`` (``r × d_in``) and ``g`` (``r × d_out``); its gradient is
``J_s = Σ_{t∈s} g_t a_tᵀ`` (``d_out × d_in``). For a batch of ``n`` samples::

    F = (1/n) Σ_s vec(J_s) vec(J_s)ᵀ
    F V = gᵀ diag(c) a / n,   c_t = Σ_{t'∈s(t)} g_{t'}ᵀ V a_{t'}      (≈ 2 r d_in d_out)

Rows are stored with ``g`` pre-scaled by ``√(w/n)``, so a window of batches with weights ``w_j``
is the weighted sum ``F = Σ_j w_j F_j`` and the formulas above lose their ``1/n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from cgfac.curvature.base import RowBlock, check_exact_form

if TYPE_CHECKING:
    from cgfac.rows import Rows


@dataclass
class ExactRows(RowBlock):
    """``F = Σ_s vec(J_s) vec(J_s)ᵀ`` with ``J_s = Σ_{t∈s} g_t a_tᵀ``.

    ``sample`` maps each row to its sample (``None`` when every row is its own sample);
    ``segments`` lists ``(samples, rows per sample)`` of the stacked batches, in row order.
    """

    a: Tensor
    g: Tensor
    sample: Tensor | None
    n_samples: int
    segments: list[tuple[int, int]]
    kind: ClassVar[str] = "exact"
    supports_lowrank: ClassVar[bool] = True

    @property
    def num_samples(self) -> int:
        return self.n_samples

    def factors(self) -> None:
        """Not a Kronecker product: no explicit factors."""
        return None

    @classmethod
    def from_rows(cls, window: Sequence[Rows], weights: Sequence[float]) -> ExactRows:
        a = torch.cat([r.a for r in window])
        g = torch.cat([r.g * (w / r.n) ** 0.5 for r, w in zip(window, weights)])
        n_samples = sum(r.n for r in window)
        segments = [(r.n, r.rows_per_sample) for r in window]
        if all(r.rows_per_sample == 1 for r in window):
            return cls(a, g, None, n_samples, segments)
        counts = torch.cat([torch.full((r.n,), r.rows_per_sample) for r in window])
        sample = torch.repeat_interleave(torch.arange(n_samples), counts).to(a.device)
        return cls(a, g, sample, n_samples, segments)

    def _per_sample(self, c: Tensor) -> Tensor:
        """Row values summed within each sample, as a vector of length ``n_samples``."""
        if self.sample is None:
            return c
        return c.new_zeros(self.n_samples).index_add_(0, self.sample, c)

    def _per_row(self, z: Tensor) -> Tensor:
        return z if self.sample is None else z[self.sample]

    def jvp(self, v: Tensor) -> Tensor:
        """``c_s = ⟨J_s, V⟩`` for every sample (length ``n_samples``)."""
        return self._per_sample(((self.g @ v) * self.a).sum(1))

    def vjp(self, z: Tensor) -> Tensor:
        """``Σ_s z_s J_s = gᵀ diag(z) a`` (``d_out × d_in``)."""
        return self.g.T @ (self._per_row(z)[:, None] * self.a)

    def matvec(self, v: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``F V + λV``."""
        check_exact_form(form)
        return self.vjp(self.jvp(v)).add_(v, alpha=damping)

    def jacobi(self, damping: float, form: str = "exact") -> Tensor | None:
        """``diag(F) + λ`` as a matrix; only when rows are samples (else None: too costly)."""
        check_exact_form(form)
        if self.sample is not None:
            return None
        return ((self.g * self.g).T @ (self.a * self.a)).add_(damping)

    def rank_bound(self) -> int:
        """``min(n, d_out·d_in) ≥ rank(F)``: ``F`` sums ``n`` per-sample outer products."""
        return min(self.num_samples, self.shape[0] * self.shape[1])

    def mean_diagonal(self) -> float:
        """``tr(F)/(d_out·d_in) = Σ_s ‖J_s‖²/(d_out·d_in)``, with ``‖J_s‖² = Σ_{t,t'∈s} (g_t·g_t')(a_t·a_t')``."""
        if self.sample is None:
            total = float(((self.g * self.g).sum(1) * (self.a * self.a).sum(1)).sum())
        else:
            total, row = 0.0, 0
            for samples, per in self.segments:
                a = self.a[row: row + samples * per].reshape(samples, per, -1)
                g = self.g[row: row + samples * per].reshape(samples, per, -1)
                total += float(((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum())
                row += samples * per
        return total / (self.g.shape[1] * self.a.shape[1])

    def per_sample(self) -> Tensor:
        """The per-sample gradients ``J_s`` as rows of an ``n_samples × (d_out·d_in)`` matrix."""
        parts, start = [], 0
        for n, t in self.segments:
            g = self.g[start: start + n * t].reshape(n, t, -1)
            a = self.a[start: start + n * t].reshape(n, t, -1)
            parts.append(torch.bmm(g.transpose(1, 2), a).reshape(n, -1))
            start += n * t
        return torch.cat(parts)

    def gram_through_samples(self) -> bool:
        """Whether ``K`` is cheaper from the per-sample gradients (``r p + n² p``) than from the
        rows' Gram matrices (``r² (d_in + d_out)``, ``r × r`` memory): samples with many rows."""
        r, n = self.a.shape[0], self.n_samples
        p = self.a.shape[1] * self.g.shape[1]
        return self.sample is not None and r * p + n * n * p < r * r * (self.a.shape[1] + self.g.shape[1])

    def _a_gram(self) -> Tensor:
        """``a aᵀ`` (``r × r``): the inner products of the input rows."""
        return self.a @ self.a.T

    def gram(self) -> Tensor:
        """``K_{st} = ⟨J_s, J_t⟩`` (``n_samples × n_samples``): block sums of ``(g gᵀ) ⊙ (a aᵀ)``,
        or ``J Jᵀ`` from the per-sample gradients, whichever is cheaper."""
        if self.gram_through_samples():
            j = self.per_sample()
            return j @ j.T
        k = (self.g @ self.g.T) * self._a_gram()
        if self.sample is None:
            return k
        n = self.n_samples
        k = k.new_zeros(n, k.shape[1]).index_add_(0, self.sample, k)
        return k.new_zeros(n, n).index_add_(1, self.sample, k)

    def solve_lowrank(self, grad: Tensor, damping: float, form: str = "exact", *, check: bool = True) -> Tensor:
        """Exact solve by Woodbury through the ``n × n`` Gram matrix ``K``::

        (λI + K) z = c,  c_s = ⟨J_s, ∇W⟩,   X = (∇W − Σ_s z_s J_s) / λ

        (no eigendecomposition: ``check`` changes nothing)
        """
        check_exact_form(form)
        if self.gram_through_samples():
            j = self.per_sample()
            k, c = j @ j.T, j @ grad.reshape(-1)

            def vjp(z: Tensor) -> Tensor:
                return (j.T @ z).reshape(grad.shape)
        else:
            k, c, vjp = self.gram(), self.jvp(grad), self.vjp
        k.diagonal().add_(damping)
        z = torch.linalg.solve(k, c[:, None])[:, 0]
        return (grad - vjp(z)) / damping
