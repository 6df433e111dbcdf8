"""``nn.Linear`` (and any module computing ``F.linear`` with its own ``weight``/``bias``), and the
transposed layout of Hugging Face's ``transformers.pytorch_utils.Conv1D`` (``y = x @ weight + b``,
``weight``: ``d_in × d_out``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cgfac.layers.base import LayerHelper


class LinearHelper(LayerHelper):
    """Rows are all leading positions of the input (each one a sample, ``T = 1``)."""

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        a = x.reshape(-1, x.shape[-1])
        return self.with_ones(a), a.shape[0]

    def output_rows(self, grad_output: Tensor) -> Tensor:
        g = grad_output.reshape(-1, grad_output.shape[-1])
        return g if self.out_slice is None else g[:, self.out_slice]


class Conv1DHelper(LinearHelper):
    """``y = x @ weight + bias`` with ``weight`` of shape ``d_in × d_out`` (HF ``Conv1D``): the
    layer matrix is ``[weightᵀ, bias]`` (``d_out × d_in``); rows as for ``nn.Linear``. The
    weight's rows (FSDP2's shards) are the layer matrix's columns, as for ``nn.Embedding``."""

    weight_transposed = True

    def __init__(self, name: str, module: nn.Module, has_bias: bool) -> None:
        super().__init__(name, module, has_bias)

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[0] + int(self.has_bias)

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor:
        gw = parts[0].T
        return torch.cat([gw, parts[1].reshape(-1, 1)], dim=1) if self.has_bias else gw

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]:
        if not self.has_bias:
            return [x.T]
        return [x[:, :-1].T, x[:, -1]]


def linear_helper(name: str, module: nn.Module) -> LinearHelper | str:
    """Factory for ``nn.Linear`` and any module with a ``weight`` (``d_out × d_in``) used as
    ``F.linear(x, weight, bias)`` on its first input."""
    if not module.weight.requires_grad:
        return "weight is frozen; its trainable bias keeps the plain gradient"
    bias = getattr(module, "bias", None)
    return LinearHelper(name, module, bias is not None and bias.requires_grad)


def conv1d_helper(name: str, module: nn.Module) -> Conv1DHelper | str:
    """Factory for HF ``Conv1D`` and any module with a ``weight`` (``d_in × d_out``) used as
    ``x @ weight + bias`` on its first input (one line:
    ``cgfac.register_layer_helper(Conv1D, cgfac.layers.conv1d_helper)``; unregistered, such
    modules are recognised by a registration-time probe, :mod:`cgfac.layers.probe`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return "no 2-D weight (d_in x d_out) for x @ weight + bias"
    if not weight.requires_grad:
        return "weight is frozen; its trainable bias keeps the plain gradient"
    bias = getattr(module, "bias", None)
    return Conv1DHelper(name, module, bias is not None and bias.requires_grad)
