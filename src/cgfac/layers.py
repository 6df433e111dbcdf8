"""Per-layer-type helpers: how a module's inputs and output gradients become curvature rows.

A covered layer is viewed as one matrix ``W`` of shape ``d_out × d_in`` (the bias, when it is
trained, is the last column, and the rows ``a`` gain a column of ones). A mini-batch of ``n``
samples gives ``r = n·T`` rows: ``a`` (``r × d_in``) and ``g`` (``r × d_out``, the per-sample loss
gradients with respect to the layer output), the ``T`` rows of a sample being contiguous.

* ``Linear``: every leading position of the input is a row and a sample (``T = 1``).
* ``Conv2d``: the KFC construction (Grosse & Martens 2016). The input is unfolded into patches,
  one row of length ``C_in·k_h·k_w`` (+1) per output location, so ``T = H_out·W_out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Rows:
    """Curvature rows of one layer: ``a`` (``r × d_in``), ``g`` (``r × d_out``), ``n`` samples."""

    a: Tensor
    g: Tensor
    n: int

    @property
    def rows_per_sample(self) -> int:
        return self.a.shape[0] // self.n


@dataclass
class Chunk:
    """Inputs of one forward pass, paired with the output gradients of its backward pass(es)."""

    a: Tensor
    n: int
    g: Tensor | None = None
    per_sample: bool = False  # True when ``g`` already holds per-sample gradients


@dataclass
class LayerHelper:
    """Base of the per-layer-type helpers. Subclasses define how rows are extracted."""

    name: str
    module: nn.Module
    has_bias: bool
    chunks: list[Chunk] = field(default_factory=list)

    # --- shapes -----------------------------------------------------------------------------
    @property
    def d_out(self) -> int:
        return self.module.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.module.weight[0].numel() + int(self.has_bias)

    # --- rows ---------------------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows ``a`` (with the ones column) and the sample count of one forward input."""
        raise NotImplementedError

    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Rows ``g`` (``r × d_out``) of a gradient with respect to the layer output."""
        raise NotImplementedError

    def with_ones(self, a: Tensor) -> Tensor:
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)

    # --- gradient as a matrix -----------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps

    def grad_matrix(self) -> Tensor | None:
        """``∇W`` as a ``d_out × d_in`` matrix (bias last column), or None when a grad is missing."""
        w = self.module.weight
        if w.grad is None or (self.has_bias and self.module.bias.grad is None):
            return None
        gw = w.grad.reshape(self.d_out, -1)
        if self.has_bias:
            gw = torch.cat([gw, self.module.bias.grad.reshape(-1, 1)], dim=1)
        return gw

    def set_grad(self, x: Tensor) -> None:
        """Write a ``d_out × d_in`` matrix back into the parameters' ``.grad``."""
        w = self.module.weight
        if self.has_bias:
            self.module.bias.grad.copy_(x[:, -1].reshape_as(self.module.bias))
            x = x[:, :-1]
        w.grad.copy_(x.reshape_as(w))

    # --- capture ------------------------------------------------------------------------------
    def take_rows(self, *, mean_reduced: bool, max_samples: int | None) -> Rows | None:
        """Pair and stack the captured chunks into per-sample :class:`Rows`, then forget them.

        Empirical rows hold raw output gradients; with a mean-reduced loss over all captured
        samples they become per-sample gradients when multiplied by the total sample count
        (``mean_reduced``; a summed loss gives them as they are). Chunks without a backward pass
        are dropped. ``max_samples`` keeps the first samples (batches are shuffled).
        """
        chunks = [c for c in self.chunks if c.g is not None]
        self.chunks = []
        if not chunks:
            return None
        n_total = sum(c.n for c in chunks)
        a_parts, g_parts, n = [], [], 0
        for c in chunks:
            g = c.g if c.per_sample else c.g * (n_total if mean_reduced else 1)
            a_parts.append(c.a)
            g_parts.append(g)
            n += c.n
        a, g = torch.cat(a_parts), torch.cat(g_parts)
        if max_samples is not None and n > max_samples:
            t = a.shape[0] // n
            a, g, n = a[: max_samples * t], g[: max_samples * t], max_samples
        return Rows(a=a, g=g, n=n)


class LinearHelper(LayerHelper):
    """``nn.Linear``: rows are all leading positions of the input."""

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        a = x.reshape(-1, x.shape[-1])
        return self.with_ones(a), a.shape[0]

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` (zero padding, ``groups == 1``): KFC patch rows, ``T = H_out·W_out``."""

    def __init__(self, name: str, module: nn.Conv2d, has_bias: bool, padding: tuple[int, int]):
        super().__init__(name, module, has_bias)
        self.padding = padding

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        m = self.module
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        n = patches.shape[0]
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (n·T, C_in·k_h·k_w)
        return self.with_ones(a), n

    def output_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | str:
    """Symmetric zero padding of a conv, or the reason it is not covered."""
    if module.groups != 1:
        return f"groups={module.groups} (grouped convolutions are not covered)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only zero padding is covered)"
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                return "padding='same' with asymmetric padding is not covered"
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(module.padding[0]), int(module.padding[1]))


def make_helper(name: str, module: nn.Module) -> LayerHelper | str | None:
    """The helper for a covered module, a reason string for an uncovered one, None if untrainable.

    A module counts only for its own (non-recursive) parameters. A frozen weight leaves the
    layer alone; a frozen bias is left out of the layer matrix.
    """
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(module).__name__} is not a covered layer type"
    if not module.weight.requires_grad:
        return "weight is frozen; its trainable bias keeps the plain gradient"
    has_bias = module.bias is not None and module.bias.requires_grad
    if isinstance(module, nn.Linear):
        return LinearHelper(name, module, has_bias)
    padding = conv_padding(module)
    if isinstance(padding, str):
        return padding
    return Conv2dHelper(name, module, has_bias, padding)
