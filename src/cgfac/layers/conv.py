"""Convolutions of any dimensionality (``nn.Conv1d``/``2d``/``3d``): the KFC construction.

Grosse & Martens 2016: the input is padded (in the layer's ``padding_mode``, with the layer's
possibly asymmetric ``"same"`` amounts) and unfolded into patches, one row of length
``C_in/groups · Π k`` (+1 for the bias) per output location, so a sample has ``T = Π out`` rows.
A grouped convolution (``groups > 1``, depthwise included) is block-diagonal over groups: group
``j`` is its own unit ``name:group{j}`` with the input channels and output channels of that group,
solved on its own.
"""

from __future__ import annotations

import math
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from cgfac.layers.base import LayerGroup, LayerHelper

PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def conv_pads(module: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last spatial dim first, ``lo, hi`` each), as the layer pads its input."""
    nd = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0] * (2 * nd)
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    pads = []
    for p in reversed(module.padding):
        pads += [int(p), int(p)]
    return pads


def unfold_patches(x: Tensor, kernel_size, stride, dilation) -> Tensor:
    """Patches of an already padded ``(n, C, *spatial)`` input: ``(n·T, C·Π k)``, in the order of
    ``F.unfold`` (channel, then kernel offsets), one row per output location."""
    nd = len(kernel_size)
    c = x.shape[1]
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # x: (n, C, *out, *k) -> (n, *out, C, *k)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    return x.reshape(-1, c * math.prod(kernel_size))


class ConvHelper(LayerHelper):
    """One group of a convolution (the whole layer when ``groups == 1``)."""

    def __init__(self, name: str, module: nn.modules.conv._ConvNd, has_bias: bool, pads: list[int],
                 group: int | None = None) -> None:
        groups = module.groups
        per_out = module.out_channels // groups
        out_slice = None if group is None else slice(group * per_out, (group + 1) * per_out)
        super().__init__(name, module, has_bias, out_slice=out_slice)
        self.pads = pads
        self.mode = PAD_MODES[module.padding_mode]
        self.group = group
        self.nd = len(module.kernel_size)

    @property
    def padding(self) -> tuple[int, ...]:
        """Symmetric padding per spatial dim (first dim first), when it is symmetric."""
        return tuple(self.pads[2 * i] for i in reversed(range(self.nd)))

    def batch_size(self, x: Tensor) -> int | None:
        return x.shape[0] if x.dim() == self.nd + 2 else None

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        m = cast(nn.modules.conv._ConvNd, self.module)  # the module given to ``__init__``
        if x.dim() == self.nd + 1:
            x = x.unsqueeze(0)
        if self.group is not None:
            per_in = m.in_channels // m.groups
            x = x[:, self.group * per_in: (self.group + 1) * per_in]
        if any(self.pads):
            x = F.pad(x, self.pads, mode=self.mode)
        n = x.shape[0]
        a = unfold_patches(x, m.kernel_size, m.stride, m.dilation)
        return self.with_ones(a), n

    def output_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == self.nd + 1:
            grad_output = grad_output.unsqueeze(0)
        if self.out_slice is not None:
            grad_output = grad_output[:, self.out_slice]
        return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])


Conv2dHelper = ConvHelper  # the name of the Conv2d-only helper before any-dimensional support


def conv_helper(name: str, module: nn.modules.conv._ConvNd) -> LayerHelper | LayerGroup | str:
    """Factory for ``nn.Conv1d``/``2d``/``3d``: one unit, or one per group."""
    if not module.weight.requires_grad:
        return "weight is frozen; its trainable bias keeps the plain gradient"
    if module.padding_mode not in PAD_MODES:
        return f"padding_mode={module.padding_mode!r} is not covered"
    has_bias = module.bias is not None and module.bias.requires_grad
    pads = conv_pads(module)
    if module.groups == 1:
        return ConvHelper(name, module, has_bias, pads)
    parts: list[LayerHelper] = [ConvHelper(f"{name}:group{j}", module, has_bias, pads, group=j)
                                for j in range(module.groups)]
    return LayerGroup(name, module, parts, note=f"groups={module.groups}, one block per group")


def transposed_conv_reason(name: str, module: nn.Module) -> str:
    return (f"{type(module).__name__}: transposed convolutions are not covered (their KFC rows are "
            "the patches of the output gradient, not of the input; not implemented)")
