"""``nn.Linear`` (and any module computing ``F.linear`` with its own ``weight``/``bias``)."""

from __future__ import annotations

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


def linear_helper(name: str, module: nn.Module) -> LinearHelper | str:
    """Factory for ``nn.Linear`` and any module with a ``weight`` (``d_out × d_in``) used as
    ``F.linear(x, weight, bias)`` on its first input."""
    if not module.weight.requires_grad:
        return "weight is frozen; its trainable bias keeps the plain gradient"
    bias = getattr(module, "bias", None)
    return LinearHelper(name, module, bias is not None and bias.requires_grad)
