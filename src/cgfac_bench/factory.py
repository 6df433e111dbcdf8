"""The optimizer of a ``cgfac-bench train`` run by name: :func:`make_optimizer`, through the registry
:data:`BUILDERS` (one builder per name of :data:`cgfac_bench.hyper.ALL_OPTIMIZERS`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import nn

import cgfac
from cgfac_bench.hyper import ALL_OPTIMIZERS, SGD_MOMENTUM, SecondOrder
from cgfac_bench.peers import ADAMW_WEIGHT_DECAY, muon_with_adamw
from cgfac_bench.tasks import reconstruction_loss

Built = tuple[torch.optim.Optimizer, cgfac.Preconditioner | None]
# (name, model, lr, settings, loss type) -> the optimizer and, for kfac and cgfac-*, its preconditioner
Builder = Callable[[str, nn.Module, float, SecondOrder, str], Built]


def make_optimizer(name: str, model: nn.Module, lr: float, hp: SecondOrder,
                   loss_type: str = "cross_entropy") -> tuple[torch.optim.Optimizer, cgfac.Preconditioner | None]:
    """The torch optimizer of a run and, for the preconditioned runs, its preconditioner.

    The ``*-adaptive`` optimizers are :mod:`cgfac.optim`'s (they own the update; ``lr`` multiplies
    the quadratic model's step, ``hp.damping`` is the initial λ); ``kfac``, ``cgfac-*`` are
    preconditioners under SGD with momentum and the KL clip; SOAP and Shampoo come from
    ``pytorch-optimizer`` (the ``bench`` extra), SOAP with its defaults, Shampoo as its scalable
    variant with the preconditioner recomputed every 20 steps (its default, 1000, never would in a
    short run).
    """
    builder = BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"optimizer must be one of {ALL_OPTIMIZERS}, got {name!r}")
    return builder(name, model, lr, hp, loss_type)


# --- the peers -----------------------------------------------------------------------------------
def _adam(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    return torch.optim.Adam(model.parameters(), lr=lr), None


def _adamw(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY), None


def _sgd(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM), None


def _muon(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    """``muon``: AdamW-like learning rates (``match_rms_adamw``); ``muon-original``: Keller Jordan's scaling."""
    return muon_with_adamw(model, lr, adjust_lr_fn="match_rms_adamw" if name == "muon" else "original"), None


def _pytorch_optimizer(name: str) -> Any:
    try:
        import pytorch_optimizer
    except ImportError:
        raise RuntimeError(f"{name} needs pytorch-optimizer: pip install 'cgfac[bench]'") from None
    return pytorch_optimizer


def _soap(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    return _pytorch_optimizer(name).SOAP(model.parameters(), lr=lr), None


def _shampoo(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    shampoo = _pytorch_optimizer(name).ScalableShampoo
    return shampoo(model.parameters(), lr=lr, preconditioning_compute_steps=20), None


# --- cgfac.optim: the *-adaptive optimizers own the update ---------------------------------------
def _adaptive(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    common: dict[str, Any] = {"damping": hp.damping, "fisher": hp.fisher, "loss_type": loss_type, "lr": lr,
                              "adaptive": hp.adaptive, "adapt_damping": hp.adaptive != "none",
                              "quad_samples": hp.quad_samples, "quad_every": hp.quad_every,
                              "quad_tol": hp.quad_tol,
                              "min_damping": hp.min_damping,
                              "damping_scale": hp.damping_scale}
    if hp.adaptive == "none":
        common["momentum"] = hp.momentum
    if loss_type == "bernoulli" and hp.adaptive != "none":  # the autoencoders: the target is the input, so
        common["loss_fn"] = reconstruction_loss  # the damping check replays the forward (no backward)
    if name == "kfac-adaptive":
        return cgfac.optim.KFAC(model, factor_decay=hp.factor_decay, inv_update_steps=hp.inv_update_steps,
                                factor_update_steps=hp.factor_update_steps,
                                curvature_samples=hp.kfac_samples, damping_form=hp.damping_form, **common), None
    if name == "cgfac-kron-adaptive":
        common["damping_form"] = hp.damping_form
    curvature = cast(Literal["kron", "exact"], name.split("-")[1])
    return cgfac.optim.CGFAC(model, curvature=curvature, curvature_window=hp.curvature_window,
                             curvature_samples=hp.curvature_samples, factor_decay=hp.factor_decay,
                             **common), None


# --- kfac and cgfac-*: a preconditioner under SGD with momentum ----------------------------------
def _preconditioned_sgd(name: str, model: nn.Module, lr: float,
                        hp: SecondOrder) -> tuple[torch.optim.SGD, dict[str, Any]]:
    """SGD with momentum and the preconditioner's common keywords (its ``lr``: the SGD's current one)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=hp.momentum)

    def current_lr(step: int) -> float:
        return opt.param_groups[0]["lr"]

    common: dict[str, Any] = {"damping": hp.damping, "kl_clip": hp.kl_clip, "lr": current_lr, "fisher": hp.fisher,
                              "damping_scale": hp.damping_scale, "graft": hp.graft}
    if name in ("kfac", "cgfac-kron"):
        common["damping_form"] = hp.damping_form
    return opt, common


def _kfac(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    opt, common = _preconditioned_sgd(name, model, lr, hp)
    pre = cgfac.KFAC(model, factor_decay=hp.factor_decay, inv_update_steps=hp.inv_update_steps,
                     factor_update_steps=hp.factor_update_steps, curvature_samples=hp.kfac_samples, **common)
    return opt, pre


def _cgfac(name: str, model: nn.Module, lr: float, hp: SecondOrder, loss_type: str) -> Built:
    opt, common = _preconditioned_sgd(name, model, lr, hp)
    curvature = cast(Literal["kron", "exact"], name.removeprefix("cgfac-"))
    pre = cgfac.CGFAC(model, curvature=curvature, curvature_window=hp.curvature_window,
                      curvature_samples=hp.curvature_samples, factor_decay=hp.factor_decay, **common)
    return opt, pre


BUILDERS: dict[str, Builder] = {
    "kfac-adaptive": _adaptive,
    "cgfac-kron-adaptive": _adaptive,
    "cgfac-exact-adaptive": _adaptive,
    "cgfac-kron": _cgfac,
    "cgfac-exact": _cgfac,
    "kfac": _kfac,
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "soap": _soap,
    "shampoo": _shampoo,
    "muon": _muon,
    "muon-original": _muon,
}
