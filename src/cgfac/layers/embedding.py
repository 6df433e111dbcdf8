"""``nn.Embedding``: one-hot rows, so the input factor is diagonal (token counts).

Convention: the layer matrix is ``W = weightᵀ`` (``d_out × d_in = embedding_dim × num_embeddings``),
so ``y = W onehot(i)`` is the row ``weight[i]``, and the Kronecker system is the usual
``G X A + λX = ∇W`` with ``A = diag(counts)/r`` over the vocabulary and ``G = gᵀg/n`` over the
embedding dimension. Every leading position of the input is a row and a sample (as for
``nn.Linear``). The rows ``a`` are the token indices (one column, float), never one-hot rows.

* ``curvature="kron"`` and K-FAC: with ``G = Q diag(s) Qᵀ`` (from the rows ``g``, a QR when they
  are fewer than ``d_out``), column ``v`` of ``X`` solves ``(A_vv G + λ) X_v = ∇W_v``::

      X = ∇W/λ + Q [C ⊘ (s A_diagᵀ + λ) − C/λ],   C = Qᵀ ∇W

  exact and direct whatever ``solver`` says (cheaper than any of them).
* ``curvature="exact"``: the exact empirical-Fisher block through index gathers and scatters
  (CG or Woodbury, like any other layer).
* ``padding_idx``: positions holding it are samples with a zero gradient (their ``g`` rows are
  zeroed), as autograd gives that row no gradient; its column of ``X`` stays zero.
* ``max_norm``: covered (the renormalisation is done in place outside autograd; rows are as above).
* ``sparse=True`` (sparse ``.grad``) and ``scale_grad_by_freq`` (not a sum of ``g aᵀ``): reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from cgfac.curvature.base import check_exact_form
from cgfac.curvature.exact import ExactRows
from cgfac.curvature.kron import eigh, factor_eig
from cgfac.layers.base import LayerHelper, Rows
from cgfac.solvers.eigen import FactorKind, register_factor_kind

MAX_INDEX = 2**24  # indices are carried as float rows: exact in float32 below this


def _index_and_g(rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (long, padding rows as -1), a non-negative index for gathers, and ``g`` with padding
    rows zeroed."""
    idx = rows.a[:, 0].round().long()
    keep = idx >= 0
    return idx, idx.clamp_min(0), rows.g * keep[:, None].to(rows.g.dtype)


def _counts(idx: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    keep = idx >= 0
    return torch.zeros(size, dtype=dtype, device=idx.device).index_add_(
        0, idx[keep], torch.ones(int(keep.sum()), dtype=dtype, device=idx.device))


@dataclass
class DiagKron:
    """``A = diag(a_diag)`` and ``G = gᵀg`` (rows ``g``): the embedding's Kronecker system."""

    a_diag: Tensor
    g: Tensor
    method = "diag-kron"

    @classmethod
    def from_rows(cls, window: Sequence[Rows], weights: Sequence[float], size: int) -> DiagKron:
        a_diag: Tensor | None = None
        g_parts: list[Tensor] = []
        for r, w in zip(window, weights):
            idx, _, g = _index_and_g(r)
            part = _counts(idx, size, g.dtype) * (w / r.a.shape[0])
            a_diag = part if a_diag is None else a_diag + part
            g_parts.append(g * (w / r.n) ** 0.5)
        return cls(cast(Tensor, a_diag), torch.cat(g_parts))  # a window holds at least one batch

    def solve(self, grad: Tensor, damping: float, *, check: bool = True) -> Tensor:
        """Through ``G``'s eigenpairs (:func:`~cgfac.curvature.factor_eig`; ``check``: of its eigendecomposition)."""
        s, q = factor_eig(self.g, check=check)
        return DiagKronEigen(self.a_diag, s, q).solve(grad, damping)

    def mean_diagonal(self) -> float:
        """``tr(A)·tr(G)/(d_in·d_out)``."""
        return float(self.a_diag.mean()) * float((self.g * self.g).sum()) / self.g.shape[1]


@dataclass
class DiagKronEigen:
    """``A = diag(a_diag)``, ``G = Q diag(s) Qᵀ`` (``Q`` may have fewer columns than ``d_out``)."""

    a_diag: Tensor
    s_g: Tensor
    q_g: Tensor

    def solve(self, grad: Tensor, damping: float) -> Tensor:
        c = self.q_g.T @ grad
        inner = c / (torch.outer(self.s_g, self.a_diag) + damping) - c / damping
        return grad / damping + self.q_g @ inner

    def mean_diagonal(self) -> float:
        """``tr(A)·tr(G)/(d_in·d_out)`` (``G``'s trace is that of its kept eigenvalues)."""
        return float(self.a_diag.mean()) * float(self.s_g.sum()) / self.q_g.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.a_diag, self.s_g, self.q_g


@dataclass
class ExactIndexRows(ExactRows):
    """The exact empirical-Fisher block with one-hot input rows given by their indices ``a``."""

    width: int = 0  # d_in (num_embeddings)
    index: Tensor | None = None  # clamped indices for gathers

    @property
    def shape(self) -> tuple[int, int]:
        return self.g.shape[1], self.width

    @classmethod
    def from_index_rows(cls, window: Sequence[Rows], weights: Sequence[float], size: int) -> ExactIndexRows:
        base = ExactRows.from_rows(window, weights)
        idx, gather, g = _index_and_g(Rows(base.a, base.g, base.n_samples))
        return cls(idx, g, base.sample, base.n_samples, base.segments, width=size, index=gather)

    @property
    def _index(self) -> Tensor:
        # set by :meth:`from_index_rows` (a default only because the base dataclass has defaults)
        return cast(Tensor, self.index)

    def jvp(self, v: Tensor) -> Tensor:
        return self._per_sample((self.g * v[:, self.index].T).sum(1))

    def vjp(self, z: Tensor) -> Tensor:
        out = self.g.new_zeros(self.g.shape[1], self.width)
        return out.index_add_(1, self._index, (self.g * self._per_row(z)[:, None]).T)

    def jacobi(self, damping: float, form: str = "exact") -> Tensor | None:
        check_exact_form(form)
        if self.sample is not None:
            return None
        out = self.g.new_zeros(self.g.shape[1], self.width)
        return out.index_add_(1, self._index, (self.g * self.g).T).add_(damping)

    def per_sample(self) -> Tensor:
        parts = [self.vjp(torch.eye(self.n_samples, dtype=self.g.dtype, device=self.g.device)[s]).reshape(-1)
                 for s in range(self.n_samples)]
        return torch.stack(parts)

    def gram_through_samples(self) -> bool:
        return False  # the per-sample gradients are d_out × num_embeddings each

    def mean_diagonal(self) -> float:
        """``Σ_s ‖J_s‖²/(d_out·d_in)`` with one-hot rows: ``a_t·a_t' = [i_t = i_t']``."""
        if self.sample is None:
            total = float((self.g * self.g).sum())
        else:
            total, row = 0.0, 0
            for samples, per in self.segments:
                i = self.a[row: row + samples * per].reshape(samples, per)
                g = self.g[row: row + samples * per].reshape(samples, per, -1)
                same = (i[:, :, None] == i[:, None, :]).to(g.dtype)
                total += float(((g @ g.transpose(1, 2)) * same).sum())
                row += samples * per
        return total / (self.g.shape[1] * self.width)

    def _a_gram(self) -> Tensor:
        return (self.a[:, None] == self.a[None, :]).to(self.g.dtype)


class EmbeddingHelper(LayerHelper):
    """Rows: token indices (``a``, one float column) and output gradients (``g``)."""

    structure = "diag-kron"
    weight_transposed = True

    def __init__(self, name: str, module: nn.Module) -> None:  # an nn.Embedding, or a probed look-alike
        super().__init__(name, module, False)
        self.padding_idx = getattr(module, "padding_idx", None)

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    @property
    def row_widths(self) -> tuple[int, int]:
        return 1, self.d_out

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor:
        """The layer matrix is ``∇Wᵀ`` (``d_out = embedding_dim`` rows): the weight's rows (the
        embeddings, FSDP2's shards) are its columns."""
        return parts[0].T

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]:
        return [x.T]

    def batch_size(self, x: Tensor) -> int | None:
        return x.shape[0] if x.dim() >= 1 else None

    def dense_rows(self, rows: Rows) -> tuple[Tensor, Tensor]:
        """One-hot rows ``a`` (``r × num_embeddings``; a padding position's row is zero) and ``g``
        with padding rows zeroed."""
        idx, gather, g = _index_and_g(rows)
        a = torch.nn.functional.one_hot(gather, self.d_in).to(g.dtype) * (idx >= 0)[:, None].to(g.dtype)
        return a, g

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        idx = x.reshape(-1)
        if self.padding_idx is not None:
            idx = torch.where(idx == self.padding_idx, -1, idx)
        return idx.to(torch.float32)[:, None], idx.shape[0]

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def operator(self, curvature: str, window: Sequence[Rows], weights: Sequence[float]):
        if curvature == "kron":
            return DiagKron.from_rows(window, weights, self.d_in)
        return ExactIndexRows.from_index_rows(window, weights, self.d_in)


class DiagKronFactors(FactorKind):
    """K-FAC's factors of an embedding (structure ``"diag-kron"``): ``diag(A)`` (the index counts,
    ``d_in = num_embeddings``) and ``G``; decomposed as :class:`DiagKronEigen` (``G``'s eigenpairs)."""

    def batch_factors(self, rows: Rows) -> tuple[Tensor, ...]:
        op = DiagKron.from_rows([rows], [1.0], self.d_in)
        return op.a_diag, op.g.T @ op.g

    def zero_factors(self, like: Tensor) -> tuple[Tensor, ...]:
        return like.new_zeros(self.d_in), like.new_zeros(self.d_out, self.d_out)

    def decompose(self, factors: Sequence[Tensor]) -> DiagKronEigen:
        a_diag, g_factor = factors
        return DiagKronEigen(a_diag, *eigh(g_factor))

    def rebuild(self, tensors: Sequence[Tensor]) -> DiagKronEigen:
        return DiagKronEigen(*tensors)

    def empty_tensors(self, factors: Sequence[Tensor]) -> list[Tensor]:
        a_diag, g_factor = factors
        return [torch.zeros_like(a_diag), g_factor.new_zeros(g_factor.shape[0]), torch.zeros_like(g_factor)]

    def cost(self) -> float:
        return float(self.d_out**3 + self.d_in * self.d_out)


register_factor_kind(EmbeddingHelper.structure, DiagKronFactors)

def embedding_helper(name: str, module: nn.Embedding) -> EmbeddingHelper | str:
    if not module.weight.requires_grad:
        return "weight is frozen"
    if module.sparse:
        return "sparse=True: its sparse .grad keeps the plain gradient (not covered)"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq=True: the gradient is not a sum of per-row outer products (not covered)"
    if module.num_embeddings > MAX_INDEX:
        return f"num_embeddings > {MAX_INDEX}: indices would not be exact as float rows (not covered)"
    return EmbeddingHelper(name, module)
