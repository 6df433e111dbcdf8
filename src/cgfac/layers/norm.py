"""Normalisation layers (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``).

The affine scale ``γ`` and shift ``β`` form a layer matrix of ``C`` rows (one per feature) and
columns ``[γ, β]`` (``[γ]`` without a trained shift). Rows: ``a`` the normalised input ``x̂`` and
``g`` the output gradient, arranged ``(n·T, C)``. A sample's gradient for feature ``c`` is
``j_{s,c} = (Σ_t g_{s,t,c} x̂_{s,t,c}, Σ_t g_{s,t,c})``, and the curvature is the *exact*
per-feature block ``F_c = (1/n) Σ_s j_{s,c} j_{s,c}ᵀ`` (2×2, or 1×1), damped like the rest:
``X_c = (F_c + λI)⁻¹ ∇_c``, solved exactly. The same block serves ``curvature="kron"``,
``curvature="exact"`` and K-FAC (which keeps a running average of ``F`` and refreshes the block it
solves with every ``inv_update_steps``).

Samples: ``LayerNorm``/``RMSNorm`` take every leading position as a sample (as ``nn.Linear``);
``GroupNorm``/``BatchNorm`` take the batch dimension, with ``T`` spatial positions per sample.
``BatchNorm`` couples samples through its batch statistics; ``x̂`` is taken as given (training
mode: the batch statistics), so ``j_s`` is sample ``s``'s share of the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgfac.layers.base import LayerHelper, Rows
from cgfac.solvers.eigen import FactorKind, register_factor_kind


def feature_jacobians(rows: Rows, k: int) -> Tensor:
    """Per-sample, per-feature gradients ``(n, C, k)``."""
    n = rows.n
    g = rows.g.reshape(n, -1, rows.g.shape[1])
    a = rows.a.reshape(n, -1, rows.a.shape[1])
    parts = [(g * a).sum(1)] + ([g.sum(1)] if k == 2 else [])
    return torch.stack(parts, dim=-1)


def feature_blocks(window: Sequence[Rows], weights: Sequence[float], k: int) -> Tensor:
    """``F = Σ_j w_j (1/n_j) Σ_s j_s j_sᵀ`` per feature: ``(C, k, k)``."""
    total: Tensor | None = None
    for r, w in zip(window, weights):
        j = feature_jacobians(r, k)
        part = torch.einsum("sci,scj->cij", j, j) * (w / r.n)
        total = part if total is None else total + part
    return cast(Tensor, total)  # a window holds at least one batch


@dataclass
class FeatureBlocks:
    """Exact per-feature blocks ``F_c``; ``X_c = (F_c + λI)⁻¹ ∇_c``."""

    blocks: Tensor
    method = "feature-blocks"

    def solve(self, grad: Tensor, damping: float, *, check: bool = True) -> Tensor:
        """``(F_c + λI)⁻¹ ∇_c`` (no eigendecomposition: ``check`` changes nothing)."""
        k = self.blocks.shape[-1]
        eye = torch.eye(k, dtype=self.blocks.dtype, device=self.blocks.device)
        return torch.linalg.solve(self.blocks + damping * eye, grad[..., None])[..., 0]

    def mean_diagonal(self) -> float:
        """The mean diagonal entry of the blocks, ``tr(F)/dim``."""
        return float(torch.diagonal(self.blocks, dim1=-2, dim2=-1).mean())

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.blocks,)


class NormHelper(LayerHelper):
    """Rows ``x̂`` and ``g``, ``(n·T, C)``; the exact per-feature block (see the module docstring)."""

    structure = "feature-blocks"

    @property
    def d_out(self) -> int:
        return self.weight.numel()

    @property
    def d_in(self) -> int:
        return 1 + int(self.has_bias)

    @property
    def row_widths(self) -> tuple[int, int]:
        return self.d_out, self.d_out

    def normalised(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        bn = cast(nn.modules.batchnorm._BatchNorm, m)  # the remaining registered types: BatchNorm1d/2d/3d
        batch_stats = bn.training or not bn.track_running_stats
        return F.batch_norm(x, None if batch_stats else bn.running_mean, None if batch_stats else bn.running_var,
                            training=batch_stats, eps=bn.eps)

    def _arrange(self, t: Tensor) -> tuple[Tensor, int]:
        if isinstance(self.module, (nn.LayerNorm, nn.RMSNorm)):
            rows = t.reshape(-1, self.d_out)
            return rows, rows.shape[0]
        if t.dim() == 2:  # (N, C)
            return t, t.shape[0]
        if isinstance(self.module, nn.GroupNorm) and t.dim() == 1:
            return t[None], 1
        return t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1]), t.shape[0]

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        return self._arrange(self.normalised(x))

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return self._arrange(grad_output)[0]

    def operator(self, curvature: str, window: Sequence[Rows], weights: Sequence[float]) -> FeatureBlocks:
        return FeatureBlocks(feature_blocks(window, weights, self.d_in))


class FeatureBlockFactors(FactorKind):
    """K-FAC's factors of a normalisation layer (structure ``"feature-blocks"``): the per-feature
    blocks ``(C, k, k)`` (``C = d_out``, ``k = d_in``), solved directly (:class:`FeatureBlocks`)."""

    def batch_factors(self, rows: Rows) -> tuple[Tensor, ...]:
        return (feature_blocks([rows], [1.0], self.d_in),)

    def zero_factors(self, like: Tensor) -> tuple[Tensor, ...]:
        return (like.new_zeros(self.d_out, self.d_in, self.d_in),)

    def decompose(self, factors: Sequence[Tensor]) -> FeatureBlocks:
        return FeatureBlocks(factors[0].clone())

    def rebuild(self, tensors: Sequence[Tensor]) -> FeatureBlocks:
        return FeatureBlocks(*tensors)

    def empty_tensors(self, factors: Sequence[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(factors[0])]

    def cost(self) -> float:
        return float(self.d_out * self.d_in**3)


register_factor_kind(NormHelper.structure, FeatureBlockFactors)

EPS_NAMES = ("eps", "variance_epsilon", "epsilon")  # where model-specific norms keep ε (LlamaRMSNorm: variance_epsilon)


def module_eps(module: nn.Module, default: float = 1e-6) -> float:
    """The ``ε`` of a model-specific normalisation module: its ``eps``, ``variance_epsilon`` or
    ``epsilon`` attribute (a float), else ``default``."""
    for attr in EPS_NAMES:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return default


class FeatureNormHelper(NormHelper):
    """A model-specific module normalising the last dimension (``C`` features) and scaling it by
    ``weight`` (and shifting by ``bias``): ``kind="rms"`` (``x/√(mean(x²) + ε)``, e.g.
    ``LlamaRMSNorm``) or ``"layer"`` (``(x − mean)/√(var + ε)``). Positions are samples, as for
    ``nn.RMSNorm``; the block is :class:`NormHelper`'s."""

    def __init__(self, name: str, module: nn.Module, has_bias: bool, kind: str, eps: float) -> None:
        if kind not in ("rms", "layer"):
            raise ValueError(f"kind must be 'rms' or 'layer', got {kind!r}")
        super().__init__(name, module, has_bias)
        self.kind, self.eps = kind, eps

    def normalised(self, x: Tensor) -> Tensor:
        shape = (self.d_out,)
        if self.kind == "rms":
            return F.rms_norm(x, shape, eps=self.eps)
        return F.layer_norm(x, shape, eps=self.eps)

    def _arrange(self, t: Tensor) -> tuple[Tensor, int]:
        rows = t.reshape(-1, self.d_out)
        return rows, rows.shape[0]


def rms_norm_helper(name: str, module: nn.Module) -> FeatureNormHelper | str:
    """Factory for an RMSNorm-like module (``weight · x/√(mean(x²) + ε)`` over the last
    dimension, ``ε`` read by :func:`module_eps`), e.g. one line for Llama:
    ``cgfac.register_layer_helper(LlamaRMSNorm, cgfac.layers.rms_norm_helper)``. Unregistered,
    such modules are recognised by a registration-time probe (:mod:`cgfac.layers.probe`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return "no 1-D scale (weight) over the last dimension"
    if not weight.requires_grad:
        return "scale (weight) is frozen; a trainable shift keeps the plain gradient"
    bias = getattr(module, "bias", None)
    return FeatureNormHelper(name, module, isinstance(bias, Tensor) and bias.requires_grad, "rms", module_eps(module))


def norm_helper(name: str, module: nn.Module) -> NormHelper | str:
    weight = getattr(module, "weight", None)
    if weight is None or not weight.requires_grad:
        return "scale (weight) is absent or frozen; a trainable shift keeps the plain gradient"
    bias = getattr(module, "bias", None)
    return NormHelper(name, module, bias is not None and bias.requires_grad)
