"""Tied weights: one Parameter used by several covered modules is preconditioned as one block.

The typical case is a language model whose output head shares the token embedding's matrix
(``lm_head.weight is wte.weight``, ``V × D``): the head's layer matrix is ``weight`` (``V × D``), the
embedding's is ``weightᵀ`` (``D × V``). Both uses' gradients add up on the one ``.grad``, so the
block is the shared matrix in one orientation, the *reference* use's (the first use whose layer
matrix is not transposed, e.g. the head; else the first use), with every use's trained bias as an
extra column (``[W, b_1, ..., b_m]``; a use's rows carry a one in its own bias column, zeros in the
others). Each use's rows enter the block in that orientation:

* a use in the reference orientation (the head): its rows as they are, ``a`` (inputs), ``g``
  (per-sample output gradients);
* a transposed use (the embedding): the roles swap, ``J = g aᵀ`` becomes ``Jᵀ = a gᵀ``: its rows
  ``a`` in the block are its output gradients ``g`` (``D`` wide) and its rows ``g`` are its one-hot
  input rows (``V`` wide). A padding position is a zero row of both.

**The Kronecker approximation of the sum of the uses.** Sample ``s`` has the gradient
``J_s = Σ_uses g aᵀ`` (in block orientation). The uses of one forward pass with the same samples
(the embedding and the head of a language model: every position is a sample) are joined per
sample, exactly as the uses of a module called several times in one forward (``T`` = the number of
uses, KFC's weight-sharing convention, K-FAC "expand")::

    A = (1/(nT)) Σ_s Σ_uses ã ãᵀ,      G = (1/n) Σ_s Σ_uses g̃ g̃ᵀ,      F ≈ A ⊗ G

i.e. the sum of the per-use factors, averaged over uses on the input side. A use's factors are
only defined up to a scale (``c·A_u ⊗ G_u/c`` is the same product), which the sum would not be:
each use is first *balanced*, ``ã = √c_u a``, ``g̃ = g/√c_u`` with
``c_u = √(mean diag G_u / mean diag A_u)``, so its two factors have the same mean eigenvalue. The
scale of a use then is its own curvature's (``mean diag (A_u ⊗ G_u)``), whatever the layer
convention puts in ``A`` or ``G``; ``J_s`` is unchanged by the balancing, so
``curvature="exact"`` (the empirical-Fisher block of the shared matrix from the joined rows,
``F = (1/n) Σ_s vec J_s vec J_sᵀ``, cross terms between the uses included) is exact. When uses
have identical statistics, ``A ⊗ G = Σ_uses A_u ⊗ G_u`` exactly. Uses with different sample
counts (not the same samples) are stacked as separate samples instead.

The same rows serve K-FAC (running factors ``A``, ``G`` of these rows) and CG-FAC (every solver of
``curvature="kron"`` and ``"exact"``). The embedding's diagonal input factor is not kept: the head
already needs a dense ``V × V`` factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from cgfac.layers.base import Capture, Chunk, LayerHelper, Rows, join_per_sample


@dataclass
class TiedUse:
    """One module's use of the shared weight: its own helper, whether its layer matrix is the
    block's transpose, and the block column of its bias (None: no trained bias)."""

    name: str
    helper: LayerHelper
    flipped: bool
    bias_column: int | None


def tie_reason(helpers: Sequence[LayerHelper]) -> str | None:
    """Why these helpers (the uses of one shared Parameter) cannot form one tied block, or None."""
    from cgfac.layers.embedding import EmbeddingHelper
    from cgfac.layers.linear import LinearHelper

    weights = {id(h.weight) for h in helpers}
    for h in helpers:
        if not isinstance(h, (LinearHelper, EmbeddingHelper)):
            return f"{type(h.module).__name__} ({type(h).__name__}) is not a linear or embedding use"
        if h.out_slice is not None:
            return f"{h.name!r} uses a slice of its weight"
        if h.weight.dim() != 2:
            return f"{h.name!r}'s weight is not a matrix"
    if len(weights) != 1:
        return "the modules share a parameter other than their weight (a bias alone)"
    ref = reference_use(helpers)
    for h in helpers:
        if h.weight_transposed != ref.weight_transposed and h.has_bias:
            return f"{h.name!r} uses the weight transposed and has a bias (not a column of the block)"
    return None


def reference_use(helpers: Sequence[LayerHelper]) -> LayerHelper:
    """The use whose orientation the block takes: the first with a non-transposed layer matrix
    (a linear head rather than the embedding), else the first."""
    return next((h for h in helpers if not h.weight_transposed), helpers[0])


class TiedHelper(LayerHelper):
    """One block for a Parameter used by several modules (see the module docstring)."""

    structure = "kron"

    def __init__(self, name: str, uses: Sequence[tuple[str, LayerHelper]]) -> None:
        helpers = [h for _, h in uses]
        reason = tie_reason(helpers)
        if reason is not None:
            raise ValueError(f"uses: cannot tie: {reason}")
        ref = reference_use(helpers)
        super().__init__(name, ref.module, False, weight=ref.weight)
        self.transposed = ref.weight_transposed  # the block is weightᵀ (only embeddings use it)
        self.biases: list[Tensor] = []
        self.uses: list[TiedUse] = []
        for use_name, h in uses:
            column = None
            if h.has_bias:
                assert h.bias is not None
                ids = [id(b) for b in self.biases]
                if id(h.bias) not in ids:
                    self.biases.append(h.bias)
                    ids.append(id(h.bias))
                column = ids.index(id(h.bias))
            self.uses.append(TiedUse(use_name, h, h.weight_transposed != self.transposed, column))
        self.has_bias = bool(self.biases)
        self.bias = self.biases[0] if self.biases else None

    # --- the block's matrix: [W (block orientation), b_1, ..., b_m] -------------------------------
    @property
    def width(self) -> int:
        """Columns of the shared matrix in the block's orientation."""
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    @property
    def d_in(self) -> int:
        return self.width + len(self.biases)

    def params(self) -> list[Tensor]:
        return [self.weight, *self.biases]

    def sampling_params(self) -> list[Tensor]:
        return []  # every use's rows come through its own output (the true Fisher's sampled backward)

    def grad_parts(self) -> list[tuple[Tensor, slice | None]]:
        return [(self.weight, None), *((b, None) for b in self.biases)]

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor:
        w = parts[0].T if self.transposed else parts[0]
        return torch.cat([w, *(p.reshape(-1, 1) for p in parts[1:])], dim=1) if len(parts) > 1 else w

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]:
        w = x[:, : self.width]
        return [w.T if self.transposed else w, *(x[:, self.width + j] for j in range(len(self.biases)))]

    # --- capture: each use's own hooks record into its own helper --------------------------------
    @property
    def chunks(self) -> list[Chunk]:
        return [c for u in getattr(self, "uses", []) for c in u.helper.chunks]

    @chunks.setter
    def chunks(self, value: list[Chunk]) -> None:
        if value:
            raise ValueError("a tied block's chunks live in its uses' helpers")
        for u in getattr(self, "uses", []):
            u.helper.discard_rows()

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        return [h for u in self.uses for h in u.helper.attach(capture)]

    def describe(self) -> str:
        parts = ", ".join(f"{u.name!r} ({type(u.helper.module).__name__}{', transposed' if u.flipped else ''})"
                          for u in self.uses)
        bias = f" (+{len(self.biases)} bias column{'s' if len(self.biases) > 1 else ''})" if self.biases else ""
        return f"tied weight: one block {self.d_out}x{self.d_in}{bias} for the uses {parts}"

    def _use_rows(self, use: TiedUse, rows: Rows) -> Rows:
        """One use's rows in the block's orientation and columns, balanced (module docstring)."""
        a, g = use.helper.dense_rows(rows)
        ones = None
        if use.helper.has_bias:
            a, ones = a[:, :-1], a[:, -1]
        if use.flipped:
            a, g = g, a
        full = a.new_zeros(a.shape[0], self.d_in)
        full[:, : self.width] = a
        if ones is not None and use.bias_column is not None:
            full[:, self.width + use.bias_column] = ones
        mean_a = float((full * full).sum()) / (full.shape[0] * self.d_in)
        mean_g = float((g * g).sum()) / (rows.n * self.d_out)
        c = (mean_g / mean_a) ** 0.5 if mean_a > 0 and mean_g > 0 else 1.0
        if not (c == c and 0 < c < float("inf")):
            c = 1.0
        return Rows(a=full * c**0.5, g=g / c**0.5, n=rows.n)

    def take_rows(self, *, mean_reduced: bool, max_samples: int | None) -> Rows | None:
        """Every use's rows (its own :meth:`LayerHelper.take_rows`), in the block's orientation,
        joined per sample when the uses have the same samples, else stacked."""
        parts = []
        for use in self.uses:
            rows = use.helper.take_rows(mean_reduced=mean_reduced, max_samples=max_samples)
            if rows is not None:
                parts.append(self._use_rows(use, rows))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        n = parts[0].n
        if all(p.n == n for p in parts):
            return Rows(a=join_per_sample([p.a for p in parts], n), g=join_per_sample([p.g for p in parts], n), n=n)
        # Not the same samples: each use's rows are samples of their own (T = 1 for these uses).
        return Rows(a=torch.cat([p.a for p in parts]), g=torch.cat([p.g for p in parts]),
                    n=sum(p.a.shape[0] for p in parts))
