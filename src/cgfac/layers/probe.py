"""Layer types of the ecosystem without a registration: recognised by shape and a probe.

A module whose type has no registered helper is probed at registration when its own trainable
parameters are exactly ``weight`` (and optionally ``bias``). The module's forward is run once on
a small random input with random stand-in parameters (``torch.func.functional_call``, no grad,
the global random state untouched), and its output is compared with each candidate:

==================  ==========================================  ================================
rule                candidate (weight shape)                    helper
==================  ==========================================  ================================
``probe:linear``    ``F.linear(x, weight, bias)`` (``d_out × d_in``)  :class:`~cgfac.layers.LinearHelper`
``probe:conv1d``    ``x @ weight + bias`` (``d_in × d_out``, HF ``Conv1D``)  :class:`~cgfac.layers.Conv1DHelper`
``probe:embedding``  ``F.embedding(i, weight)`` (``V × D``)       :class:`~cgfac.layers.EmbeddingHelper`
``probe:rms-norm``  ``weight · x/√(mean x² + ε)`` (+ ``bias``; ``C``)  :class:`~cgfac.layers.FeatureNormHelper`
``probe:layer-norm``  ``weight · (x − μ)/√(σ² + ε) + bias`` (``C``)   :class:`~cgfac.layers.FeatureNormHelper`
(either norm)       the scale ``1 + weight`` (``GemmaRMSNorm``)       the same block (``∂y/∂weight`` is ``x̂``)
``probe:router``    ``(F.linear(x, weight), ...)`` (a MoE router)  :class:`~cgfac.layers.RouterHelper`
``probe:experts``   ``F.linear``/``@``/``_grouped_mm`` with 3-D ``E × d × d'``  :class:`~cgfac.layers.ExpertsGroup`
==================  ==========================================  ================================

A module with 3-D trainable parameters is probed as a mixture-of-experts layer
(:func:`cgfac.layers.experts.experts_helper`: called as ``module(hidden, top_k_index, top_k_weights)``).

(``ε`` is read from the module's ``eps``/``variance_epsilon``/``epsilon``; the probe's inputs
have unit scale, so the comparison does not depend on it.) A module matching none keeps its plain
gradient, with the reason. Registering the type (``cgfac.register_layer_helper``) skips the probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgfac import dtensor
from cgfac.layers.base import LayerGroup, LayerHelper
from cgfac.layers.embedding import MAX_INDEX, EmbeddingHelper
from cgfac.layers.experts import RouterHelper, experts_helper
from cgfac.layers.linear import Conv1DHelper, LinearHelper
from cgfac.layers.norm import FeatureNormHelper, module_eps

_TOL = 1e-4  # relative: modules that compute in float32 internally (LlamaRMSNorm) still match
_FLOAT64_PROBE = 1 << 22  # stand-in weights up to this many numbers are float64 (on CPU), larger float32
_MAX_PROBE = 1 << 26  # skip the probe for stand-in weights larger than this (256 MB of float32)


def _close(y: object, want: Tensor) -> bool:
    if not isinstance(y, Tensor) or y.shape != want.shape:
        return False
    y = y.to(want.dtype)
    return bool(torch.isfinite(y).all()) and float((y - want).abs().max()) <= _TOL * (1 + float(want.abs().max()))


def probe_helper(name: str, module: nn.Module) -> LayerHelper | LayerGroup | str:
    """A helper for an unregistered module recognised by its probe (its ``rule`` says which
    candidate matched), or the reason it is not covered."""
    kind = type(module).__name__
    own = dict(module.named_parameters(recurse=False))
    cubes = [p for p in own.values() if p.dim() == 3 and p.requires_grad]
    if cubes and min(p.shape[0] for p in cubes) >= 2 and len({p.shape[0] for p in cubes}) == 1:
        return experts_helper(name, module)  # E ≥ 2 experts of one leading size
    if set(own) not in ({"weight"}, {"weight", "bias"}):
        free = ", ".join(f"{k} ({'x'.join(map(str, p.shape))})" for k, p in own.items() if p.requires_grad)
        return (f"{kind} is not a covered layer type: its own parameters {free} are not a layer's weight and bias "
                "(free parameters such as class tokens, position tables or state-space parameters: plain gradient; "
                "its child layers are covered on their own)")
    weight, bias = own["weight"], own.get("bias")
    if not weight.requires_grad:
        return f"{kind} is not a covered layer type (not probed: weight is frozen)"
    if dtensor.is_sharded(weight) or weight.is_meta or not weight.is_floating_point():
        return (f"{kind} is not a covered layer type (not probed: sharded, meta or non-float weight; register it "
                "with cgfac.register_layer_helper)")
    if weight.numel() > _MAX_PROBE:
        return f"{kind} is not a covered layer type (not probed: weight too large; register it)"
    shapes_ok = (weight.dim() == 2 and (bias is None or bias.dim() == 1)) or weight.dim() == 1
    if not shapes_ok:
        return f"{kind} is not a covered layer type (not probed: weight of {weight.dim()} dims)"
    trained_bias = bias is not None and bias.requires_grad
    gen = torch.Generator(device=weight.device).manual_seed(0)
    dev = weight.device
    dtype = torch.float64 if dev.type == "cpu" and weight.numel() <= _FLOAT64_PROBE else torch.float32

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    stand_in = {"weight": rand(*weight.shape)}
    if bias is not None:
        stand_in["bias"] = rand(*bias.shape)
    w, b = stand_in["weight"], stand_in.get("bias")

    def run(x: Tensor) -> object:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                return torch.func.functional_call(module, stand_in, (x,))
        except Exception:  # a candidate's input the module does not accept is simply no match
            return None

    tried = []
    if weight.dim() == 2:
        d0, d1 = weight.shape
        x = rand(2, 3, d1)
        tried.append("F.linear")
        out = run(x)
        if (bias is None or bias.shape[0] == d0) and _close(out, F.linear(x, w, b)):
            return _rule(LinearHelper(name, module, trained_bias),
                         "probe:linear (forward is F.linear(x, weight, bias))")
        tried.append("a router's (F.linear(x, weight), ...)")
        want = F.linear(x, w)
        if (bias is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor)
                and out[0].numel() == want.numel() and _close(out[0].reshape(want.shape), want)):
            return _rule(RouterHelper(name, module, False),
                         "probe:router (its output's first tensor is F.linear(x, weight): the logits)")
        x = rand(2, 3, d0)
        tried.append("x @ weight + bias")
        if bias is None or bias.shape[0] == d1:
            want = x @ w + (b if b is not None else 0)
            if _close(run(x), want):
                return _rule(Conv1DHelper(name, module, trained_bias),
                             "probe:conv1d (forward is x @ weight + bias, HF Conv1D layout)")
        if bias is None and d0 <= MAX_INDEX:
            idx = torch.randint(0, d0, (2, 3), generator=gen, device=dev)
            tried.append("F.embedding")
            if _close(run(idx), F.embedding(idx, w)):
                return _rule(EmbeddingHelper(name, module), "probe:embedding (forward is F.embedding(i, weight))")
    else:
        c = weight.shape[0]
        if bias is None or bias.shape == weight.shape:
            x = rand(2, 3, c) * 2 + 0.5
            eps = module_eps(module)
            out = run(x)
            shift = b if b is not None else 0
            for norm_kind, normalised in (("rms", F.rms_norm(x, (c,), eps=eps)),
                                          ("layer", F.layer_norm(x, (c,), eps=eps))):
                # the scale is weight, or 1 + weight (GemmaRMSNorm): ∂y/∂weight = x̂ either way, one block
                for offset, scale_text in ((0.0, "weight"), (1.0, "1 + weight")):
                    tried.append(f"{norm_kind}-norm" + (" (1 + weight)" if offset else ""))
                    if _close(out, (w + offset) * normalised + shift):
                        return _rule(FeatureNormHelper(name, module, trained_bias, norm_kind, eps),
                                     f"probe:{norm_kind}-norm ({scale_text} scales a {norm_kind}-normalised last "
                                     f"dimension, eps={eps:g})")
    candidates = ", ".join(tried) or "the candidates"
    return (f"{kind} is not a covered layer type (probe: its forward is none of {candidates}; "
            "see cgfac.register_layer_helper)")


def _rule(helper: LayerHelper, rule: str) -> LayerHelper:
    helper.rule = rule
    return helper
