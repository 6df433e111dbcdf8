"""``nn.MultiheadAttention``: its in-projection (packed ``in_proj_weight`` or separate
``q/k/v_proj_weight``) and its ``out_proj``.

``F.multi_head_attention_forward`` applies ``F.linear`` to the module's own parameters, so no
module hook fires for the projections (``out_proj`` is never called as a module either). This
helper re-implements nothing: after the module's forward it walks the autograd graph of the
attention output (down to the inputs), finds the matrix products (``addmm``/``mm``) whose weight
operand is (a slice of) one of the projection weights, takes the rows ``a`` from the product's
saved input and the rows ``g`` from a pre-hook on that autograd node (the gradient with respect
to the projection's output).

Blocks: ``name:q_proj``, ``name:k_proj``, ``name:v_proj`` (each ``E × (E_in + 1)``: the packed
weight is split into its three projections, which have different inputs in cross-attention) and
``name.out_proj``. Samples are the batch elements (sequences), with ``T`` = sequence length rows
each (the KFC / "K-FAC expand" convention), so ``curvature="exact"`` is the per-sequence Fisher.
``bias_k``/``bias_v`` (``add_bias_kv=True``) keep their plain gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cgfac.layers.base import Capture, LayerGroup, LayerHelper, eager

# Autograd nodes between a parameter and the matrix product using it: transposes, and splits of
# the packed weight along its rows (``w.split``/``w.chunk`` in ``F.multi_head_attention_forward``).
_VIEW_NODES = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0"}
_SPLITS = {"SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0"}
# (node type, index of the weight operand in next_functions, saved input)
_PRODUCTS = {"AddmmBackward0": (2, "_saved_mat1"), "MmBackward0": (1, "_saved_self")}


class ProjectionHelper(LayerHelper):
    """One projection: rows come from the autograd graph (see the module docstring)."""

    forward_weight: Tensor | None = None  # the weight the last forward used (FSDP2: the unsharded one)

    def describe(self) -> str:
        return super().describe()

    def sampling_params(self) -> list[Tensor]:
        return [self.weight if self.forward_weight is None else self.forward_weight]


def _weight_param(node) -> tuple[Tensor, int, int] | None:
    """The leaf tensor reached from a product's weight operand through transposes and row splits,
    with the rows (dim 0) of it that the operand holds: ``(param, first row, rows)``."""
    row0, rows = 0, None
    for _ in range(16):
        if node is None:
            return None
        name = type(node).__name__
        if name == "AccumulateGrad":
            param = node.variable
            return param, row0, param.shape[0] if rows is None else rows
        if name not in _VIEW_NODES and name not in _SPLITS:
            return None
        nexts = [(nx, i) for nx, i in node.next_functions if nx is not None]
        if len(nexts) != 1:
            return None
        nx, index = nexts[0]
        if type(nx).__name__ in _SPLITS:
            if rows is not None or getattr(nx, "_saved_dim", 0) != 0:
                return None
            if hasattr(nx, "_saved_split_sizes"):
                sizes = list(nx._saved_split_sizes)
                row0, rows = sum(sizes[:index]), sizes[index]
            else:
                size = nx._saved_split_size
                row0, rows = index * size, size
        node = nx
    return None


def find_products(root, params: Sequence[Tensor], stop: set) -> list[tuple[Any, Tensor, Tensor, int, int]]:
    """``(node, param, saved input, first weight row, rows)`` for every product in the graph
    above ``root`` (not beyond ``stop``) whose weight operand is a slice of one of ``params``."""
    ids = {id(p) for p in params}
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        kind = _PRODUCTS.get(type(node).__name__)
        if kind is not None:
            w_index, saved_in = kind
            hit = _weight_param(node.next_functions[w_index][0])
            if hit is not None and id(hit[0]) in ids:
                found.append((node, hit[0], getattr(node, saved_in), hit[1], hit[2]))
        if type(node).__name__ != "AccumulateGrad":
            stack.extend(nx for nx, _ in node.next_functions)
    return found


class MultiheadAttentionHelper(LayerGroup):
    """The projections of an ``nn.MultiheadAttention`` (see the module docstring)."""

    def __init__(self, name: str, module: nn.MultiheadAttention, parts: list[LayerHelper], note: str) -> None:
        super().__init__(name, module, parts, note)

    def claims(self) -> list[nn.Module]:
        return [cast(nn.Module, self.module.out_proj)]

    def attach(self, capture: Capture) -> list[RemovableHandle]:
        module = self.module
        units = self.parts
        # The projections' weights by name: FSDP2 (fully_shard) swaps each module attribute for an
        # unsharded Parameter around the forward, and that one is in the autograd graph. A
        # pre-hook (after FSDP2's, which unshards) records the weights the forward will use.
        by_id = {id(p): n for n, p in module.named_parameters()}
        weight_names = [by_id[id(u.weight)] for u in units]
        in_forward: list[list[Tensor]] = [[u.weight for u in units]]

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            in_forward[0] = [_attribute(mod, n) for n in weight_names]
            for unit, weight in zip(units, in_forward[0]):
                if isinstance(unit, ProjectionHelper):
                    unit.forward_weight = weight

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if not capture.capturing(mod):
                return
            weights = in_forward[0]
            params = list({id(w): w for w in weights}.values())
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, Tensor) or out.grad_fn is None:
                return
            names = ("query", "key", "value")
            inputs = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
            query = cast(Tensor, inputs[0])  # required by MultiheadAttention.forward
            batched = query.dim() == 3
            n = (query.shape[0] if mod.batch_first else query.shape[1]) if batched else 1
            stop = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
            for node, param, x, row0, rows in find_products(out.grad_fn, params, stop):
                x = x.detach()
                length = x.shape[0] // n
                a = x.reshape(length, n, -1).transpose(0, 1).reshape(length * n, -1)  # (L, N) → (N, L)
                targets = []
                for unit, weight in zip(units, weights):
                    if weight is not param:
                        continue
                    u0 = 0 if unit.out_slice is None else unit.out_slice.start
                    if row0 <= u0 and u0 + unit.d_out <= row0 + rows:
                        chunk = capture.record_input(unit, unit.with_ones(a), n)
                        targets.append((unit, chunk, slice(u0 - row0, u0 - row0 + unit.d_out)))
                if targets:
                    node.register_prehook(_grad_hook(capture, targets, n, length))

        # _EagerForward is used like the hook handles: only ``remove()`` is called on them.
        return [module.register_forward_pre_hook(eager(pre_hook)),
                module.register_forward_hook(eager(hook), with_kwargs=True),
                cast(RemovableHandle, _EagerForward(module))]


class _EagerForward:
    """Runs a module's forward outside ``torch.compile`` while attached (removable like a hook
    handle): the rows of attention are found in its eager autograd graph (``addmm`` nodes), which
    a compiled forward would fuse into one opaque node. The module's ``forward`` attribute becomes
    an :class:`_EagerCall` (which follows the module through ``copy.deepcopy`` and pickling); a
    module with a ``forward`` of its own is left alone."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.active = "forward" not in vars(module)
        if self.active:
            module.forward = _EagerCall(module)

    def remove(self) -> None:
        if self.active and isinstance(vars(self.module).get("forward"), _EagerCall):
            del self.module.forward
        self.active = False


class _EagerCall:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        return _class_forward(self.module, *args, **kwargs)


@eager
def _class_forward(module: nn.Module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _attribute(module: nn.Module, dotted: str) -> Tensor:
    """``module.a.b`` for ``"a.b"``: a Parameter, or what ``functional_call`` put in its place."""
    out: object = module
    for part in dotted.split("."):
        out = getattr(out, part)
    assert isinstance(out, Tensor)
    return out


def _grad_hook(capture: Capture, targets: list, n: int, length: int):
    def prehook(grad_outputs: tuple) -> None:
        g = grad_outputs[0]
        if g is None:
            return
        g = g.detach()
        g = g.reshape(length, n, -1).transpose(0, 1).reshape(length * n, -1)
        for unit, chunk, cols in targets:
            capture.record_output_grad(unit, chunk, g[:, cols])

    return prehook


def mha_helper(name: str, module: nn.MultiheadAttention) -> MultiheadAttentionHelper | str:
    e = module.embed_dim
    parts: list[LayerHelper] = []
    bias = module.in_proj_bias
    has_bias = bias is not None and bias.requires_grad
    plain = []
    weights: list[tuple[Tensor, slice | None]]
    if module._qkv_same_embed_dim:
        weights = [(module.in_proj_weight, slice(i * e, (i + 1) * e)) for i in range(3)]
    else:
        weights = [(module.q_proj_weight, None), (module.k_proj_weight, None), (module.v_proj_weight, None)]
    for i, (tag, (w, sl)) in enumerate(zip(("q_proj", "k_proj", "v_proj"), weights)):
        if not w.requires_grad:
            plain.append(f"{tag} (frozen)")
            continue
        parts.append(ProjectionHelper(f"{name}:{tag}", module, has_bias, weight=w, bias=bias, out_slice=sl,
                                      bias_slice=slice(i * e, (i + 1) * e)))
    out = module.out_proj
    if out.weight.requires_grad:
        out_bias = out.bias is not None and out.bias.requires_grad
        parts.append(ProjectionHelper(f"{name}.out_proj", out, out_bias))
    else:
        plain.append("out_proj (frozen)")
    if module.bias_k is not None:
        plain.append("bias_k, bias_v")
    if not parts:
        return "every projection weight is frozen"
    note = "samples = sequences; " + (f"plain gradient: {', '.join(plain)}" if plain else "all projections")
    return MultiheadAttentionHelper(name, module, parts, note)
