"""Mixture-of-experts layers: one Kronecker block per expert, from the rows each expert received.

Hugging Face ``transformers`` ≥ 5 keeps a layer's experts as 3-D parameters (``gate_up_proj``:
``E × 2I × H``, ``down_proj``: ``E × H × I``; ``E × d_in × d_out`` where the module's layout is
transposed; optional 2-D biases ``<name>_bias``: ``E × d_out``) in one module called as
``experts(hidden_states, top_k_index, top_k_weights)``. Expert ``e`` of parameter ``P`` is the
layer matrix ``W_e = P[e]`` (``d_out × d_in``; ``P[e]ᵀ`` when transposed), one unit
(:class:`ExpertHelper`).

Rows. While the module runs, a ``TorchFunctionMode`` sees its products with the expert weights,
whichever implementation the model's config selects: ``F.linear(x_e, P[e])`` (``"eager"``),
``x_e @ P[e]`` (transposed eager) or ``torch._grouped_mm(x, Pᵀ, offs)`` (``"grouped_mm"``, the
rows of expert ``e`` between ``offs[e−1]`` and ``offs[e]``). Expert ``e``'s rows are its ``N_e``
routed tokens: ``a`` the product's input rows, ``g`` the gradient of the loss with respect to the
product's output rows; a routing weight applied after the product is inside ``g`` (chain rule).

Scale. A token not routed to ``e`` has a zero gradient for ``W_e``, so the per-expert Fisher over
the ``N`` tokens of the call is ``F_e = (1/N) Σ_{t→e} vec(g_t a_tᵀ) vec(g_t a_tᵀ)ᵀ``: the
conditional Fisher of the routed tokens times ``N_e/N``. K-FAC's blocks are
``A_e = (1/N_e) Σ_{t→e} a_t a_tᵀ`` and ``G_e = (1/N) Σ_{t→e} g_t g_tᵀ``: each unit's ``n`` is its
``N_e`` rows, and its ``g`` rows are scaled by ``√(N_e/N)`` when recorded (``g`` per-sample: a
mean-reduced loss's raw gradients times ``N``, as for every layer). An expert that received no
token in a step records nothing: CG-FAC keeps its window, K-FAC its running factors, and a unit
that never had rows keeps its plain gradient with the reason in ``layer_stats()``. Few rows are
exact for CG-FAC's low-rank solve (the cost model picks it when ``N_e ≪ d``).

``curvature_samples`` does not cut an expert's rows (the experts see flattened tokens, not batch
entries); each expert keeps every routed row, ``N·k/E`` on average for top-``k`` routing.

Routers (``...TopKRouter``: ``weight`` ``E × H``, returning ``(logits, scores, indices)`` with
``logits = F.linear(x, weight)``) are linear layers whose output is the tuple's first tensor
(:class:`RouterHelper`). Both are recognised by the registration probe by shape and by running the
module (:func:`experts_helper`, :mod:`cgfac.layers.probe`), without importing ``transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from cgfac import dtensor
from cgfac.layers.base import Capture, Chunk, LayerGroup, LayerHelper, eager
from cgfac.layers.linear import LinearHelper

__all__ = ["ExpertHelper", "ExpertsGroup", "RouterHelper", "expert_products", "experts_helper", "product_hooks"]

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, Tensor.__matmul__, torch._C.TensorBase.matmul, torch.mm, torch._C.TensorBase.mm}
_GROUPED = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
_MAX_PROBE = 1 << 24  # stand-in expert parameters up to this many numbers are probed


class ExpertHelper(LayerHelper):
    """Expert ``expert`` of a 3-D parameter ``weight``: the layer matrix ``[weight[e], bias[e]]``
    (``d_out × d_in``; ``weight[e]ᵀ`` when ``transposed``), rows from :class:`ExpertsGroup`."""

    def __init__(self, name: str, module: nn.Module, weight: Tensor, bias: Tensor | None, expert: int,
                 transposed: bool) -> None:
        trained_bias = bias is not None and bias.requires_grad
        super().__init__(name, module, trained_bias, weight=weight, bias=bias if trained_bias else None)
        self.expert = expert
        self.transposed = transposed

    @property
    def d_out(self) -> int:
        return self.weight.shape[2] if self.transposed else self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return (self.weight.shape[1] if self.transposed else self.weight.shape[2]) + int(self.has_bias)

    def _slice(self) -> slice:
        return slice(self.expert, self.expert + 1)

    def grad_parts(self) -> list[tuple[Tensor, slice | None]]:
        parts: list[tuple[Tensor, slice | None]] = [(self.weight, self._slice())]
        if self.has_bias:
            assert self.bias is not None
            parts.append((self.bias, self._slice()))
        return parts

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor:
        w = parts[0].reshape(self.weight.shape[1:])
        w = w.T if self.transposed else w
        return torch.cat([w, parts[1].reshape(-1, 1)], dim=1) if self.has_bias else w

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]:
        w = x[:, :-1] if self.has_bias else x
        w = (w.T if self.transposed else w).reshape(1, *self.weight.shape[1:])
        return [w, x[:, -1].reshape(1, -1)] if self.has_bias else [w]

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        a = x.reshape(-1, x.shape[-1])
        return self.with_ones(a), a.shape[0]

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def describe(self) -> str:
        return f"expert {self.expert}: layer matrix {self.d_out}x{self.d_in}"


class RouterHelper(LinearHelper):
    """A router: ``logits = F.linear(x, weight)`` returned as the first tensor of its output tuple."""

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        from cgfac.layers.base import unit_forward_hook

        inner = unit_forward_hook([self], capture)

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            inner(module, inputs, first)

        return [self.module.register_forward_hook(eager(hook))]


def _expert_of(view: Tensor, param: Tensor) -> tuple[int, bool] | None:
    """``(e, transposed)`` if ``view`` is ``param[e]`` (``transposed``: ``param[e]ᵀ``), else None."""
    if view._base is not param and view is not param:
        return None
    if view.dim() != 2 or (view.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()):
        return None
    e, rem = divmod(int(view.storage_offset()) - int(param.storage_offset()), int(param.stride(0)))
    if rem or not 0 <= e < param.shape[0]:
        return None
    if tuple(view.shape) == tuple(param.shape[1:]) and tuple(view.stride()) == tuple(param.stride()[1:]):
        return e, False
    if tuple(view.shape) == tuple(param.shape[1:])[::-1] and tuple(view.stride()) == tuple(param.stride()[1:])[::-1]:
        return e, True
    return None


def _grouped_layout(mat2: Tensor, param: Tensor) -> bool | None:
    """For ``torch._grouped_mm(x, mat2, offs)`` with ``mat2`` the parameter or its transpose: whether
    the layer matrix is ``param[e]`` (``mat2 = paramᵀ``, the product ``x param[e]ᵀ``), False for
    ``param[e]ᵀ`` (``mat2 = param``); None if ``mat2`` is neither."""
    if mat2 is param:
        return False
    if mat2._base is not param or mat2.dim() != 3 or mat2.storage_offset() != param.storage_offset():
        return None
    swapped = (param.shape[0], param.shape[2], param.shape[1])
    if tuple(mat2.shape) == swapped and tuple(mat2.stride()) == (param.stride(0), param.stride(2), param.stride(1)):
        return True
    return None


class _Products(TorchFunctionMode):
    """Sees an experts module's products with its 3-D parameters and reports each expert's rows."""

    def __init__(self, found: Callable[[str, list[tuple[int, int, int]], bool, Tensor, Tensor], None],
                 params: dict[str, Tensor]) -> None:
        super().__init__()
        self.found, self.params = found, params

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or len(args) < 2 or not isinstance(args[0], Tensor):
            return out
        x, w = args[0], args[1]
        if not isinstance(w, Tensor):
            return out
        if func in _LINEAR or func in _MATMUL:
            for pname, p in self.params.items():
                hit = _expert_of(w, p)
                if hit is None:
                    continue
                e, swapped = hit
                # F.linear(x, P[e]) is x P[e]ᵀ: layer matrix P[e]; x @ P[e]: layer matrix P[e]ᵀ
                transposed = (not swapped) if func in _MATMUL else swapped
                self.found(pname, [(e, 0, x.reshape(-1, x.shape[-1]).shape[0])], transposed, x, out)
                break
        elif func in _GROUPED:
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if not isinstance(offs, Tensor):
                return out
            for pname, p in self.params.items():
                layout = _grouped_layout(w, p)
                if layout is None:
                    continue
                ends = [int(v) for v in offs.tolist()]
                starts = [0, *ends[:-1]]
                self.found(pname, [(e, lo, hi) for e, (lo, hi) in enumerate(zip(starts, ends)) if hi > lo],
                           not layout, x, out)
                break
        return out


Found = Callable[[str, list[tuple[int, int, int]], bool, Tensor, Tensor], None]


def expert_products(found: Found, params: dict[str, Tensor]) -> TorchFunctionMode:
    """A mode that calls ``found(name, [(e, lo, hi)], transposed, x, out)`` for every product of an
    expert module's input with its 3-D parameters ``params`` (by name): expert ``e``'s rows are
    ``x[lo:hi]`` and ``out[lo:hi]``; enter it for the module's forward."""
    return _Products(found, params)


def product_hooks(params: dict[str, Tensor], start: Callable[[nn.Module, tuple, dict], Found | None]
                  ) -> tuple[Callable[..., None], Callable[..., None]]:
    """``(pre, post)``, forward hooks (``with_kwargs=True``; ``post`` with ``always_call=True``) of an
    experts module: ``pre`` asks ``start(module, args, kwargs)`` for this call's ``found`` (None: not
    captured) and enters :func:`expert_products` with it for the forward; ``post`` leaves it."""
    modes: list[TorchFunctionMode] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = start(module, args, kwargs)
        if found is not None:
            mode = _Products(found, params)
            mode.__enter__()
            modes.append(mode)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if modes:
            modes.pop().__exit__(None, None, None)

    return pre, post


def _bias_of(module: nn.Module, pname: str, param: Tensor) -> Tensor | None:
    bias = getattr(module, f"{pname}_bias", None)
    if isinstance(bias, Tensor) and bias.dim() == 2 and bias.shape[0] == param.shape[0]:
        return bias
    return None


class ExpertsGroup(LayerGroup):
    """The experts of one module: a unit per (3-D parameter, expert), fed by :class:`_Products`."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, Tensor], transposed: dict[str, bool],
                 note: str = "") -> None:
        self.params = params
        self.transposed = transposed
        self.by_key: dict[tuple[str, int], ExpertHelper] = {}
        parts: list[LayerHelper] = []
        for pname, p in params.items():
            for e in range(p.shape[0]):
                unit = ExpertHelper(f"{name}.{pname}:{e}", module, p, _bias_of(module, pname, p), e, transposed[pname])
                self.by_key[(pname, e)] = unit
                parts.append(unit)
        super().__init__(name, module, parts, note)

    def describe(self) -> str:
        shapes = ", ".join(f"{pname} {p.shape[0]} x {self.by_key[(pname, 0)].d_out}x{self.by_key[(pname, 0)].d_in}"
                           + (" (transposed)" if self.transposed[pname] else "")
                           for pname, p in self.params.items())
        return f"{len(self.parts)} expert blocks ({shapes}; rows: each expert's routed tokens)"

    def claims(self) -> list[nn.Module]:
        return []

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        def start(module: nn.Module, args: tuple, kwargs: dict) -> Found | None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not (isinstance(hidden, Tensor) and capture.capturing(module)):
                return None
            tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]

            def found(pname: str, segments: list[tuple[int, int, int]], transposed: bool, x: Tensor,
                      out: Tensor) -> None:
                if not out.requires_grad:
                    return
                rows_x = x.detach().reshape(-1, x.shape[-1])
                taken: list[tuple[ExpertHelper, Chunk, float, int, int]] = []
                for e, lo, hi in segments:
                    unit = self.by_key[(pname, e)]
                    if transposed != unit.transposed:
                        continue
                    a, n = unit.input_rows(rows_x[lo:hi])
                    chunk = capture.record_input(unit, a, n, n_full=tokens, batch=1)
                    # F_e = (N_e/N) × the routed rows' mean (module docstring): g scaled by √(N_e/N)
                    taken.append((unit, chunk, math.sqrt(n / tokens), lo, hi))
                if not taken:
                    return

                def on_grad(grad: Tensor) -> None:
                    rows_g = grad.detach().reshape(-1, grad.shape[-1])
                    for unit, chunk, scale, lo, hi in taken:
                        capture.record_output_grad(unit, chunk, unit.output_rows(rows_g[lo:hi]) * scale)

                out.register_hook(on_grad)
                capture.record_output([t[0] for t in taken], out)

            return found

        pre, post = product_hooks(self.params, start)
        return [self.module.register_forward_pre_hook(eager(pre), with_kwargs=True),
                self.module.register_forward_hook(eager(post), with_kwargs=True, always_call=True)]


def _probe_layout(module: nn.Module, params: dict[str, Tensor]) -> dict[str, bool] | str:
    """Run the module once on stand-in parameters and a random routing; each 3-D parameter's layout
    (transposed or not) as its products showed it, or why it is not covered."""
    first = next(iter(params.values()))
    num_experts = first.shape[0]
    dev = first.device
    gen = torch.Generator(device=dev).manual_seed(0)
    own = dict(module.named_parameters(recurse=False))
    stand_in = {k: torch.randn(v.shape, generator=gen, device=dev, dtype=torch.float32) for k, v in own.items()}
    seen: dict[str, set[bool]] = {k: set() for k in params}

    def found(pname: str, segments: list[tuple[int, int, int]], transposed: bool, x: Tensor, out: Tensor) -> None:
        seen[pname].add(transposed)

    k = min(2, num_experts)
    tokens = 2 * num_experts
    widths = sorted({d for p in params.values() for d in p.shape[1:]})
    tried = []
    for width in widths:
        x = torch.randn(tokens, width, generator=gen, device=dev)
        index = torch.stack([torch.randperm(num_experts, generator=gen, device=dev)[:k] for _ in range(tokens)])
        index[:num_experts, 0] = torch.arange(num_experts, device=dev)  # every expert receives a token
        index[:num_experts, 1:] = (index[:num_experts, :1] + 1 + torch.arange(k - 1, device=dev)) % num_experts
        weights = torch.softmax(torch.randn(tokens, k, generator=gen, device=dev), dim=-1)
        tried.append(width)
        sub = {k_: v.to(torch.float32) for k_, v in stand_in.items()}
        mode = _Products(found, {k_: sub[k_] for k_ in params})
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), mode:
                torch.func.functional_call(module, sub, (x, index, weights))
        except Exception:  # a width the module does not accept is no match
            for s in seen.values():
                s.clear()
            continue
        if all(len(s) == 1 for s in seen.values()):
            return {k_: next(iter(s)) for k_, s in seen.items()}
        for s in seen.values():
            s.clear()
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    hint = f" (experts implementation {impl!r}: 'eager' and 'grouped_mm' are captured)" if impl else ""
    return (f"{type(module).__name__}: 3-D expert parameters whose products with the input were not seen as "
            f"F.linear, @ or torch._grouped_mm when probed with hidden widths {tried}{hint}")


def experts_helper(name: str, module: nn.Module) -> ExpertsGroup | str:
    """Factory for a module holding experts as 3-D parameters (``E × d_out × d_in`` or transposed;
    optional ``<name>_bias``: ``E × d_out``), called as ``module(hidden_states, top_k_index,
    top_k_weights)``: one :class:`ExpertHelper` per expert and parameter. The layout is found by a
    probe run (module docstring); a reason string if the module is not such a layer."""
    kind = type(module).__name__
    own = {k: v for k, v in module.named_parameters(recurse=False) if v.requires_grad}
    params: dict[str, Tensor] = {k: v for k, v in own.items() if v.dim() == 3}
    if not params:
        return f"{kind} has no 3-D expert parameters"
    experts = {p.shape[0] for p in params.values()}
    if len(experts) != 1:
        return f"{kind}: 3-D parameters with different expert counts {sorted(experts)}"
    biases = {f"{k}_bias" for k in params}
    others = [k for k in own if k not in params and k not in biases]
    if others:
        return f"{kind}: 3-D expert parameters beside other parameters {others} (not probed)"
    if any(dtensor.is_sharded(p) or p.is_meta or not p.is_floating_point() for p in own.values()):
        return f"{kind}: sharded, meta or non-float expert parameters are not covered yet"
    if sum(p.numel() for p in own.values()) > _MAX_PROBE:
        layout = {k: bool(getattr(module, "is_transposed", False)) for k in params}
        note = "layout from the module's is_transposed (too large to probe)"
    else:
        probed = _probe_layout(module, params)
        if isinstance(probed, str):
            return probed
        layout, note = probed, ""
    group = ExpertsGroup(name, module, params, layout, note)
    group.rule = "probe:experts (3-D expert parameters; rows: each expert's routed tokens)"
    return group
