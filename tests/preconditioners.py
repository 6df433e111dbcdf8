"""The preconditioners every solve path is checked with, at one damping, the preconditioned
gradients they leave, and the dense directions they are checked against (shared by
``test_directions``, ``test_transforms``, ``test_relative_damping`` and ``layer_reference``)."""

from __future__ import annotations

import torch
from reference import Case, capture, covered, dense_kron, exact_fisher, factors, mean_grad, per_sample_grads, unvec, vec

import cgfac

DAMPING = 0.05

PRECONDITIONERS = {
    "kfac": lambda m: cgfac.KFAC(m, damping=DAMPING, factor_decay=0.0, inv_update_steps=1, kl_clip=None),
    "cgfac-kron-cg": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="cg",
                                           cg_tol=1e-13, cg_max_iters=2000),
    "cgfac-kron-cg-nojacobi": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="cg",
                                                    jacobi=False, cg_tol=1e-13, cg_max_iters=2000),
    "cgfac-kron-lowrank": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="lowrank"),
    "cgfac-kron-eigen": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, solver="eigen"),
    "cgfac-kron-auto": lambda m: cgfac.CGFAC(m, damping=DAMPING, kl_clip=None, cg_tol=1e-13,
                                             cg_max_iters=2000),
    "cgfac-exact-cg": lambda m: cgfac.CGFAC(m, curvature="exact", damping=DAMPING, kl_clip=None,
                                            solver="cg", cg_tol=1e-13, cg_max_iters=2000),
    "cgfac-exact-lowrank": lambda m: cgfac.CGFAC(m, curvature="exact", damping=DAMPING, kl_clip=None,
                                                 solver="lowrank"),
}


def preconditioned_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in covered(model).items():
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        out[name] = torch.cat([w, m.bias.grad[:, None]], 1) if m.bias is not None else w
    return out


def dense_directions(case: Case, model: torch.nn.Module, exact: bool) -> dict[str, torch.Tensor]:
    """``(A ⊗ G + λI)⁻¹ vec ∇W`` or ``(F + λI)⁻¹ vec ∇W`` per layer, by ``torch.linalg.solve``."""
    grads = mean_grad(case, model)
    out = {}
    if exact:
        for name, j in per_sample_grads(case, model).items():
            system = exact_fisher(j) + DAMPING * torch.eye(j.shape[1] * j.shape[2], dtype=j.dtype)
            out[name] = unvec(torch.linalg.solve(system, vec(grads[name])), grads[name].shape)
    else:
        for name, (a, g, n) in capture(case, model).items():
            a_f, g_f = factors(a, g, n)
            system = dense_kron(a_f, g_f) + DAMPING * torch.eye(a_f.shape[0] * g_f.shape[0], dtype=a.dtype)
            out[name] = unvec(torch.linalg.solve(system, vec(grads[name])), grads[name].shape)
    return out
