"""Per-layer-type helpers: how a module's inputs and output gradients become curvature rows.

* :mod:`~cgfac.layers.base`: the protocol (:class:`LayerHelper`, :class:`LayerGroup`, rows).
* :mod:`~cgfac.layers.registry`: which helper covers which module type.
* one module per family: :mod:`~cgfac.layers.linear` (and HF ``Conv1D``), :mod:`~cgfac.layers.conv`,
  :mod:`~cgfac.layers.embedding`, :mod:`~cgfac.layers.norm`, :mod:`~cgfac.layers.attention`.
* :mod:`~cgfac.layers.experts`: mixture-of-experts layers (one block per expert) and routers.
* :mod:`~cgfac.layers.tied`: one block for a Parameter used by several modules (tied weights).
* :mod:`~cgfac.layers.probe`: unregistered types recognised by shape and a registration-time probe.
"""

from typing import cast

from torch import nn

from cgfac.layers.attention import MultiheadAttentionHelper, mha_helper
from cgfac.layers.base import Capture, Chunk, LayerGroup, LayerHelper, Rows, join_per_sample
from cgfac.layers.conv import Conv2dHelper, ConvHelper, conv_helper, conv_pads, transposed_conv_reason, unfold_patches
from cgfac.layers.embedding import EmbeddingHelper, embedding_helper
from cgfac.layers.experts import ExpertHelper, ExpertsGroup, RouterHelper, experts_helper
from cgfac.layers.linear import Conv1DHelper, LinearHelper, conv1d_helper, linear_helper
from cgfac.layers.norm import FeatureNormHelper, NormHelper, norm_helper, rms_norm_helper
from cgfac.layers.probe import probe_helper
from cgfac.layers.registry import (
    HelperFactory,
    find_factory,
    make_helper,
    register_layer_helper,
    registered_helpers,
)
from cgfac.layers.tied import TiedHelper, tie_reason

# A factory typed for its module type (``conv_helper(name, module: _ConvNd)``) is a ``HelperFactory``
# for that type: the registry calls it only with instances of the type it is registered for.
register_layer_helper(nn.Linear, linear_helper)
_conv: type[nn.Module]
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_helper(_conv, cast(HelperFactory, conv_helper))
for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer_helper(_conv, transposed_conv_reason)
register_layer_helper(nn.Embedding, cast(HelperFactory, embedding_helper))
for _norm in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer_helper(_norm, norm_helper)
register_layer_helper(nn.MultiheadAttention, cast(HelperFactory, mha_helper))

__all__ = [
    "Capture", "Chunk", "Conv1DHelper", "Conv2dHelper", "ConvHelper", "EmbeddingHelper", "ExpertHelper",
    "ExpertsGroup", "FeatureNormHelper", "HelperFactory", "LayerGroup", "LayerHelper", "LinearHelper",
    "MultiheadAttentionHelper", "NormHelper", "RouterHelper", "Rows", "TiedHelper", "conv1d_helper", "conv_helper",
    "conv_pads", "embedding_helper", "experts_helper", "find_factory", "join_per_sample", "linear_helper",
    "make_helper", "mha_helper", "norm_helper", "probe_helper", "register_layer_helper", "registered_helpers",
    "rms_norm_helper", "tie_reason", "transposed_conv_reason", "unfold_patches",
]
