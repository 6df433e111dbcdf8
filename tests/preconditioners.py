"""The preconditioners every solve path is checked with, at one damping, and the preconditioned
gradients they leave (shared by ``test_directions``, ``test_relative_damping`` and ``layer_reference``)."""

from __future__ import annotations

import torch
from reference import covered

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
