"""Dense references for the layer families (float64, tiny models), shared by the tests in ``tests/layers``.

Independent of the library's helpers: per-sample gradients from ``torch.func.vmap(grad)``,
rows from explicit slicing / one-hot matrices and ``retain_grad`` output gradients, and the
damped systems solved densely (``torch.kron``, ``torch.linalg.solve``; column-major ``vec``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from preconditioners import DAMPING, PRECONDITIONERS
from reference import dense_kron, unvec, vec
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "DAMPING",
    "EXACT_KINDS",
    "KRON_KINDS",
    "PRECONDITIONERS",
    "exact_direction",
    "kron_direction",
    "library_directions",
    "output_grads",
    "per_sample_params",
]

KRON_KINDS = [k for k in PRECONDITIONERS if "exact" not in k]
EXACT_KINDS = [k for k in PRECONDITIONERS if "exact" in k]


def kron_direction(a: Tensor, g: Tensor, n: int, grad_w: Tensor, damping: float = DAMPING) -> Tensor:
    """``(A ⊗ G + λI)⁻¹ vec ∇W`` with ``A = aᵀa/r``, ``G = gᵀg/n``."""
    a_f, g_f = a.T @ a / a.shape[0], g.T @ g / n
    system = dense_kron(a_f, g_f) + damping * torch.eye(a_f.shape[0] * g_f.shape[0], dtype=a.dtype)
    return unvec(torch.linalg.solve(system, vec(grad_w)), grad_w.shape)


def exact_direction(jac: Tensor, grad_w: Tensor, damping: float = DAMPING) -> Tensor:
    """``(F + λI)⁻¹ vec ∇W`` with ``F = (1/n) Σ_s vec(J_s) vec(J_s)ᵀ`` (``jac``: ``n × d_out × d_in``)."""
    flat = jac.transpose(1, 2).reshape(jac.shape[0], -1)
    system = flat.T @ flat / jac.shape[0] + damping * torch.eye(flat.shape[1], dtype=jac.dtype)
    return unvec(torch.linalg.solve(system, vec(grad_w)), grad_w.shape)


def per_sample_params(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of every parameter: sample ``s`` is ``x[s]``, ``y[s]``, with loss
    ``loss(model(x[s:s+1]), y[s:s+1])``. Runs on a copy (``functional_call`` does not restore a
    module registered under two names)."""
    model = copy.deepcopy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xs, ys):
        return loss(functional_call(model, p, (xs.unsqueeze(0),)), ys.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def output_grads(model: nn.Module, modules: dict[str, nn.Module], run: Callable[[], Tensor]) -> tuple[dict, dict]:
    """Inputs and output gradients of ``modules`` for the summed loss ``run()`` (per-sample output
    gradients when the loss sums per-sample losses)."""
    inputs, outputs, handles = {}, {}, []
    for name, m in modules.items():
        def hook(mod, inp, out, name=name):
            inputs[name] = inp[0].detach()
            out.retain_grad()
            outputs[name] = out
        handles.append(m.register_forward_hook(hook))
    run().backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return inputs, {k: v.grad for k, v in outputs.items()}


def library_directions(kind: str, model: nn.Module, run: Callable[[], Tensor]) -> tuple[object, dict]:
    """One ``step()`` of the preconditioner ``kind`` on the mean loss ``run()``; the preconditioned
    ``.grad`` of every parameter."""
    pre = PRECONDITIONERS[kind](model)
    model.zero_grad()
    run().backward()
    pre.step()
    return pre, {n: p.grad.clone() for n, p in model.named_parameters()}
