"""The layer-helper protocol: how a module's parameters become one or more curvature blocks.

A *unit* (:class:`LayerHelper`) is one block the preconditioners solve on its own: a layer matrix
``W`` of shape ``d_out × d_in`` (the bias, when trained, is the last column) with curvature rows
``a`` (inputs) and ``g`` (per-sample output gradients), ``r = n·T`` rows for ``n`` samples, the
``T`` rows of a sample contiguous. A module may own several units (a grouped convolution: one per
group; attention: its projections), gathered by a :class:`LayerGroup`.

Three block structures exist (``LayerHelper.structure``):

* ``"kron"``: dense rows; ``G X A + λX = ∇W`` (K-FAC) or the exact empirical-Fisher block, solved
  by :mod:`cgfac.curvature` operators and :mod:`cgfac.solvers` (CG, low-rank, eigen).
* ``"diag-kron"``: the input factor ``A`` is diagonal (one-hot rows, e.g. ``nn.Embedding``), the
  rows ``a`` hold indices; solved exactly and directly.
* ``"feature-blocks"``: a small exact block per feature (normalisation layers), solved directly.

A unit decides which curvature operator represents it (:meth:`LayerHelper.operator`). K-FAC's
factors and their decomposition follow its ``structure`` (:class:`cgfac.solvers.FactorKind`: the
dense Kronecker ones for ``"kron"``; the embeddings' and normalisation layers' kinds are registered
beside their helpers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from cgfac import dtensor
from cgfac.curvature.exact import ExactRows
from cgfac.curvature.kron import KronRows
from cgfac.rows import Rows


@dataclass(eq=False)
class Chunk:
    """Inputs of one forward call, paired with the output gradients of its backward pass(es).

    ``forward_pass`` numbers the model's forward passes: chunks of one pass with the same sample
    count are uses of one layer by the same samples (a module called several times), and their
    rows are joined per sample (like extra positions of a convolution)."""

    a: Tensor
    n: int
    g: Tensor | None = None
    per_sample: bool = False  # True when ``g`` already holds per-sample gradients
    forward_pass: int = 0
    n_full: int = 0  # samples of the whole forward call (``n`` counts the kept ones); 0: ``n``
    batch: int = 0  # batch entries (dim 0 of the input) whose rows are kept; 0: ``n``

    def __post_init__(self) -> None:
        self.n_full = self.n_full or self.n
        self.batch = self.batch or self.n


class Capture(Protocol):
    """What a helper's hooks report to (implemented by :class:`cgfac.precondition.base.Preconditioner`)."""

    def capturing(self, module: nn.Module) -> bool: ...

    def capture_limit(self) -> int | None: ...

    def record_input(self, unit: LayerHelper, a: Tensor, n: int, *, n_full: int | None = None,
                     batch: int | None = None) -> Chunk: ...

    def record_output_grad(self, unit: LayerHelper, chunk: Chunk, g: Tensor) -> None: ...

    def record_output(self, units: list[LayerHelper], output: Tensor) -> None: ...

    def routed_tokens(self) -> int | None:
        """Tokens ``N`` of the mixture-of-experts call now running (``nn.ModuleList`` experts), or None."""
        ...


class LayerHelper:
    """One curvature block (a *unit*) of a module. Subclasses define how rows are extracted.

    Args:
        name: the unit's name (the module's name, or ``module_name:part`` for a part).
        module: the module whose forward hook captures the rows.
        has_bias: whether the bias is trained (then it is the last column of the layer matrix).
        weight: the weight tensor of the layer matrix (default ``module.weight``).
        bias: its bias tensor (default ``module.bias``).
        out_slice: the rows (dim 0) of ``weight``/``bias`` this unit owns (default all).
    """

    structure = "kron"
    in_experts = False  # a layer of an ``nn.ModuleList`` expert: its rows are the routed tokens of a call
    weight_transposed = False  # the layer matrix is ``weightᵀ`` (embeddings, HF Conv1D), not ``weight``
    rule = ""  # which registration rule made this helper (set by :func:`cgfac.layers.make_helper`)

    def __init__(self, name: str, module: nn.Module, has_bias: bool, *, weight: Tensor | None = None,
                 bias: Tensor | None = None, out_slice: slice | None = None,
                 bias_slice: slice | None = None) -> None:
        self.name = name
        self.module = module
        self.has_bias = has_bias
        # ``module.weight`` is typed ``Tensor | Module`` (nn.Module.__getattr__): a helper's are tensors.
        self.weight: Tensor = cast(Tensor, module.weight) if weight is None else weight
        self.bias: Tensor | None = (cast(Tensor, module.bias) if bias is None else bias) if has_bias else None
        self.out_slice = out_slice
        self.bias_slice = out_slice if bias_slice is None else bias_slice
        self.chunks: list[Chunk] = []

    # --- the layer matrix ---------------------------------------------------------------------
    # Shapes come from ``weight.shape`` alone: indexing a sharded (DTensor) weight is a collective.
    @property
    def d_out(self) -> int:
        rows = self.weight.shape[0]
        return rows if self.out_slice is None else len(range(*self.out_slice.indices(rows)))

    @property
    def d_in(self) -> int:
        return math.prod(self.weight.shape[1:]) + int(self.has_bias)

    @property
    def row_widths(self) -> tuple[int, int]:
        """Widths of the rows ``a`` and ``g`` (for communication): ``(d_in, d_out)`` by default."""
        return self.d_in, self.d_out

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def params(self) -> list[Tensor]:
        ps = [self.weight]
        if self.has_bias:
            ps.append(cast(Tensor, self.bias))  # set whenever ``has_bias`` (see ``__init__``)
        return ps

    def sampling_params(self) -> list[Tensor]:
        """What the true Fisher's sampled backward differentiates for a unit whose rows are not
        captured through its output (attention's projections): its parameters as the forward
        used them."""
        return self.params()

    def grad_parts(self) -> list[tuple[Tensor, slice | None]]:
        """The parameters whose gradients make up the layer matrix, each with the rows (dim 0,
        a unit step slice; None: all) of it that this unit uses: ``[(weight, out_slice)]`` and
        ``(bias, bias_slice)`` when the bias is trained. Sharded gradients travel by these rows."""
        parts: list[tuple[Tensor, slice | None]] = [(self.weight, self.out_slice)]
        if self.has_bias:
            assert self.bias is not None
            parts.append((self.bias, self.bias_slice))
        return parts

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor:
        """The ``d_out × d_in`` layer matrix from each part's rows (:meth:`grad_parts` order):
        ``[W.reshape(d_out, -1), b]``."""
        gw = parts[0].reshape(self.d_out, -1)
        return torch.cat([gw, parts[1].reshape(-1, 1)], dim=1) if self.has_bias else gw

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]:
        """The inverse of :meth:`matrix_from_parts`: each part's rows, shaped as in the parameter."""
        w_shape = (x.shape[0], *self.weight.shape[1:])
        if not self.has_bias:
            return [x.reshape(w_shape)]
        return [x[:, :-1].reshape(w_shape), x[:, -1]]

    def grad_matrix(self) -> Tensor | None:
        """``∇W`` as a ``d_out × d_in`` matrix (bias last column), or None when a grad is missing.
        A sharded (``DTensor``) gradient is all-gathered (:func:`cgfac.dtensor.full`)."""
        parts = self.grad_parts()
        if any(p.grad is None for p, _ in parts):
            return None
        return self.matrix_from_parts([_rows(dtensor.full(cast(Tensor, p.grad)), sl) for p, sl in parts])

    def set_grad(self, x: Tensor) -> None:
        """Write a ``d_out × d_in`` matrix back into the parameters' ``.grad`` (this rank's shard
        of it for FSDP2's sharded gradients, :func:`cgfac.dtensor.write_shard`)."""
        for (p, sl), value in zip(self.grad_parts(), self.parts_of_matrix(x)):
            dtensor.write_shard(cast(Tensor, p.grad), value, 0 if sl is None else sl.indices(p.shape[0])[0])

    # --- rows ---------------------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows ``a`` (with the ones column) and the sample count of one forward input."""
        raise NotImplementedError

    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Rows ``g`` (``r × d_out``) of a gradient with respect to the layer output."""
        raise NotImplementedError

    def dense_rows(self, rows: Rows) -> tuple[Tensor, Tensor]:
        """``(a, g)`` of :meth:`take_rows`'s rows as dense matrices (``r × d_in``, ``r × d_out``):
        the rows themselves, except where ``a`` holds something else (an embedding's indices)."""
        return rows.a, rows.g

    def batch_size(self, x: Tensor) -> int | None:
        """Entries of the batch dimension (dim 0) of a forward input, or None for an unbatched
        input. ``curvature_samples`` keeps the first entries (the rows of a sample are contiguous
        and samples are batch-major, so they are the first rows)."""
        return x.shape[0] if x.dim() >= 2 else None

    def with_ones(self, a: Tensor) -> Tensor:
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)

    # --- coverage protocol (shared with LayerGroup) ---------------------------------------------
    def units(self) -> list[LayerHelper]:
        return [self]

    def claims(self) -> list[nn.Module]:
        """Other modules (children) whose parameters this helper covers."""
        return []

    def describe(self) -> str:
        shape = f"layer matrix {self.d_out}x{self.d_in}" + (" (bias as last column)" if self.has_bias else "")
        return shape if self.structure == "kron" else f"{shape}, {self.structure}"

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(unit_forward_hook(self.units(), capture))]

    # --- curvature ------------------------------------------------------------------------------
    def operator(self, curvature: str, window: Sequence[Rows], weights: Sequence[float]) -> Any:
        """The curvature of a window of batches: an object with ``matvec``/``jacobi``/
        ``solve_lowrank`` (solved by CG, low-rank or eigen) or with ``solve(grad, damping)`` and
        ``method`` (a direct exact solve)."""
        build = KronRows if curvature == "kron" else ExactRows
        return build.from_rows(window, weights)

    # K-FAC's form of a "kron" block (:mod:`cgfac.precondition.memory`): "dense" (both factors ``d × d``),
    # "diag-in"/"diag-out" (that side's factor kept as its diagonal, basis the identity) or "diag".
    # K-FAC's factors and their decomposition are the block structure's
    # :class:`cgfac.solvers.FactorKind` (:func:`cgfac.solvers.factor_kind`), not the helper's.
    kfac_form = "dense"

    # --- capture ------------------------------------------------------------------------------
    def discard_rows(self) -> None:
        """Forget what the hooks captured since the last step (a skipped step, a layer without ``∇W``)."""
        self.chunks = []

    def take_rows(self, *, mean_reduced: bool, max_samples: int | None) -> Rows | None:
        """Pair and stack the captured chunks into per-sample :class:`Rows`, then forget them.

        Empirical rows hold raw output gradients; with a mean-reduced loss over all captured
        samples they become per-sample gradients when multiplied by the total sample count
        (``mean_reduced``; a summed loss gives them as they are). Chunks without a backward pass
        are dropped. Chunks of one forward pass with the same sample count (a module called
        several times) are the same samples: their rows are joined per sample. ``max_samples``
        keeps the rows of the first that-many batch entries (dim 0 of the input: a sequence for a
        Linear whose samples are its positions; batches are shuffled).
        """
        chunks = [c for c in self.chunks if c.g is not None]
        self.chunks = []
        if not chunks:
            return None
        groups: list[list[Chunk]] = []
        for c in chunks:
            last = groups[-1] if groups else None
            if last is not None and last[0].forward_pass == c.forward_pass and last[0].n == c.n:
                last.append(c)
            else:
                groups.append([c])
        n_total = sum(grp[0].n_full for grp in groups)
        a_parts: list[Tensor] = []
        g_parts: list[Tensor] = []
        n = 0
        left = max_samples
        for grp in groups:
            # every kept chunk has its ``g`` (filtered above)
            gs = [cast(Tensor, c.g) if c.per_sample else cast(Tensor, c.g) * (n_total if mean_reduced else 1)
                  for c in grp]
            a_grp, g_grp, n_grp = join_per_sample([c.a for c in grp], grp[0].n), join_per_sample(gs, grp[0].n), grp[0].n
            if left is not None and grp[0].batch > left:  # the first `left` entries of this chunk
                rows, n_grp = left * (a_grp.shape[0] // grp[0].batch), left * (n_grp // grp[0].batch)
                a_grp, g_grp = a_grp[:rows], g_grp[:rows]
            a_parts.append(a_grp)
            g_parts.append(g_grp)
            n += n_grp
            if left is not None:
                left -= min(left, grp[0].batch)
                if left == 0:
                    break
        a, g = torch.cat(a_parts), torch.cat(g_parts)
        return Rows(a=a, g=g, n=n)


def _rows(t: Tensor, sl: slice | None) -> Tensor:
    return t if sl is None else t[sl]


def join_per_sample(parts: list[Tensor], n: int) -> Tensor:
    """Rows of several uses by the same ``n`` samples, each sample's rows contiguous."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.reshape(n, -1, *p.shape[1:]) for p in parts], dim=1).reshape(-1, *parts[0].shape[1:])


def unit_forward_hook(units: list[LayerHelper], capture: Capture) -> Callable:
    """A forward hook recording every unit's input rows, and a tensor hook on the output for ``g``."""

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not capture.capturing(module):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = inputs[0].detach()
        limit = capture.capture_limit()
        chunks, kept, scales = [], [], []
        with record_function("cgfac.capture"):
            for unit in units:
                tokens = capture.routed_tokens() if unit.in_experts else None
                if tokens is not None:  # an expert's routed rows, all kept: the per-expert Fisher over N tokens
                    a, n = unit.input_rows(x)
                    chunks.append(capture.record_input(unit, a, n, n_full=tokens, batch=1))
                    kept.append(False)
                    scales.append(math.sqrt(n / tokens))  # G_e = Σ g gᵀ/N (cgfac.layers.experts)
                    continue
                # Rows only for the first `limit` batch entries: the input is sliced before the rows
                # are built (a convolution's patches are costly); the whole call's sample count still
                # turns a mean-reduced loss's gradients into per-sample ones.
                b = unit.batch_size(x)
                k = b if limit is None or b is None or b <= limit else limit
                a, n = unit.input_rows(x if k == b else x[:k])
                n_full = n if k is None or b is None or k == b else n // k * b  # k is None only if b is
                chunks.append(capture.record_input(unit, a, n, n_full=n_full, batch=k or 1))
                kept.append(k != b)
                scales.append(1.0)

        def on_grad(grad: Tensor) -> None:
            grad = grad.detach()
            for unit, chunk, cut, scale in zip(units, chunks, kept, scales):
                g = unit.output_rows(grad[: chunk.batch] if cut else grad)
                capture.record_output_grad(unit, chunk, g * scale if scale != 1.0 else g)

        output.register_hook(on_grad)
        capture.record_output(units, output)

    return eager(hook)


def eager(hook: Callable) -> Callable:
    """A capture hook that ``torch.compile`` does not trace: TorchDynamo breaks the graph at it
    and runs it eagerly on real tensors (its Python bookkeeping would otherwise be traced and
    recompiled for every helper type), so a compiled model's rows are the eager ones."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(hook, recursive=True) if disable is not None else hook


class LayerGroup:
    """Several units of one module (the groups of a convolution, the projections of attention)."""

    rule = ""

    def __init__(self, name: str, module: nn.Module, parts: list[LayerHelper], note: str = "") -> None:
        self.name = name
        self.module = module
        self.parts = parts
        self.note = note

    def units(self) -> list[LayerHelper]:
        return list(self.parts)

    def claims(self) -> list[nn.Module]:
        return []

    def describe(self) -> str:
        shapes = ", ".join(f"{u.name}: {u.describe()}" for u in self.parts)
        return f"{len(self.parts)} blocks ({shapes})" + (f"; {self.note}" if self.note else "")

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(unit_forward_hook(self.units(), capture))]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]
