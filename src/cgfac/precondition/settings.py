"""The keywords every preconditioner takes (:class:`cgfac.Preconditioner`'s, so :class:`cgfac.CGFAC`'s and
:class:`cgfac.KFAC`'s too), each documented and validated here: :meth:`PreconditionerSettings.check` raises
``TypeError``/``ValueError`` naming the argument, before the preconditioner registers anything.

``grad_scaler``, ``seed``, ``process_group``, ``collective_timeout`` and ``memory_budget`` are checked where
they are used (the recorder, the process group, the memory plan), as they need the model or the processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cgfac.config import DampingScale, FisherKind, GraftKind, Hyper, HyperParam, LossReduction, ShardedGrads, check
from cgfac.layers.registry import HelperFactory, check_overrides


@dataclass(frozen=True)
class PreconditionerSettings:
    """The validated keywords of a preconditioner, each field documented as the argument of the same name."""

    damping: HyperParam
    """λ > 0, a float or a callable ``step -> float``."""
    kl_clip: HyperParam | None
    """κ for the KL clip of the step, or None to disable it (applied after grafting)."""
    lr: HyperParam
    """The learning rate the optimizer will apply, used only by the KL clip."""
    skip_layers: list[str | type]
    """Module names, class names (str) or classes left with their plain gradient."""
    loss_reduction: LossReduction
    """"mean" (the loss averages per-sample losses) or "sum"."""
    fisher: FisherKind
    """"empirical" (``g`` from the user's backward) or "true" (``g`` from targets sampled by
    :meth:`cgfac.Preconditioner.sample_fisher`; the user's backward only supplies ``∇W``)."""
    grad_scaler: Any
    """A ``torch.amp.GradScaler`` whose scale multiplies the captured gradients (call
    ``scaler.unscale_(optimizer)`` before :meth:`cgfac.Preconditioner.step`)."""
    seed: int
    """Seeds the sampler of the true Fisher; across processes each rank samples from its own stream (the
    ``rank``-th of ``world`` seeds drawn from a generator seeded with ``seed``,
    :func:`cgfac.capture.capture.rank_seed`), so ranks never draw the same targets for their different samples."""
    process_group: Any
    """The ``torch.distributed`` group to work in (default: the world, when initialised); see
    :mod:`cgfac.distributed`."""
    solve_dtype: torch.dtype | None
    """Dtype of curvature and solves (default: the parameters' dtype, at least float32). ``torch.float64`` when
    λ is tiny against the curvature's scale: a solve's relative error is about ``eps · (s_max + λ) / λ``."""
    layer_helpers: dict[type, HelperFactory]
    """``{module type: factory}`` overriding the global registry (:func:`cgfac.register_layer_helper`) for this
    preconditioner; the most-derived registered class of a module wins, an override over a global entry at one
    class."""
    damping_scale: DampingScale
    """"absolute" (every layer is damped by λ) or "relative": layer ``l`` is damped by ``λ·s_l``,
    ``s_l = tr(C_l)/dim`` the mean diagonal of its curvature (``tr(A)·tr(G)/(d_in·d_out)`` for a Kronecker
    block). Relative damping is unit-free and follows each layer's own scale: where back-propagated gradients
    shrink layer by layer (deep sigmoid networks), one absolute λ swamps the early layers' curvature.
    ``layer_stats()[name]`` has the layer's ``damping`` and ``curvature_scale``."""
    collective_timeout: float | None
    """Seconds any collective of the preconditioner may wait before it raises
    :class:`cgfac.distributed.collectives.CollectiveError` (default None: the process group's timeout)."""
    graft: GraftKind
    """"none", or "rmsprop": each layer's direction keeps its direction but takes the length of RMSProp's step
    ``‖∇W / (√v̂ + ε)‖`` (Shampoo's grafting, :mod:`cgfac.precondition.graft`), so the step no longer depends
    on the curvature's scale and ``lr`` is Adam-like (use ``kl_clip=None``). Tried on the transformer
    benchmark, where the KL-clipped step trailed AdamW."""
    graft_beta2: float
    """RMSProp's ``β₂`` (in ``[0, 1)``)."""
    graft_eps: float
    """RMSProp's ``ε`` (> 0)."""
    sharded_grads: ShardedGrads
    """How FSDP2's sharded (``DTensor``) gradients reach a layer's solve (:mod:`cgfac.distributed.sharded`):
    ``"auto"`` (default) the owner scheme (the layer's owner alone gathers ``∇W`` from the shards and returns
    each rank its rows of the direction) wherever the gradients are ``Shard(0)`` on a 1-D mesh of the process
    group, else an all-gather on every rank with the reason logged once; ``"owner"``: the owner scheme or
    ``ValueError`` naming the layer; ``"all-gather"``: every rank all-gathers every layer.
    ``layer_stats()[name]["sharded"]`` says which. Plain gradients are unaffected."""
    probe_layers: bool
    """Probe modules of unregistered types at registration (:mod:`cgfac.layers.probe`: a forward that is
    ``F.linear``, HF ``Conv1D``'s ``x @ weight + b``, ``F.embedding``, or a weight scaling an
    RMS/Layer-normalised input is covered); False: only registered types."""
    memory_budget: float | None
    """The bytes the blocks' state may take (:mod:`cgfac.precondition.memory`): None (default) a quarter of
    the device's memory (CPU: total RAM; CUDA: the device's total memory) and at most 6× the trainable
    parameters' bytes (3× AdamW's state; never below 1 GB), a number ``≤ 1`` that fraction of the device's
    memory, a number ``> 1`` bytes, ``math.inf`` none. Every block's state is sized at registration, before
    anything is allocated (:attr:`cgfac.Preconditioner.memory_plan`); K-FAC gives blocks over the budget a
    cheaper form, and the registration report names each block's form, rule and bytes."""

    @classmethod
    def check(cls, *, damping: Hyper, kl_clip: Hyper | None, lr: Hyper, skip_layers: Iterable[str | type],
              loss_reduction: LossReduction, fisher: FisherKind, grad_scaler: Any, seed: int, process_group: Any,
              solve_dtype: torch.dtype | None, layer_helpers: Mapping[type, HelperFactory] | None,
              damping_scale: DampingScale, collective_timeout: float | None, graft: GraftKind, graft_beta2: float,
              graft_eps: float, sharded_grads: ShardedGrads, probe_layers: bool,
              memory_budget: float | None) -> PreconditionerSettings:
        """The settings of these arguments, each checked in turn (``TypeError``/``ValueError`` naming it)."""
        damping_h = HyperParam("damping", damping, low=0.0, low_open=True)
        kl_clip_h = None if kl_clip is None else HyperParam("kl_clip", kl_clip, low=0.0, low_open=True)
        lr_h = HyperParam("lr", lr, low=0.0)
        loss_reduction = check("loss_reduction", loss_reduction, LossReduction)
        fisher = check("fisher", fisher, FisherKind)
        skip: list[str | type] = [skip_layers] if isinstance(skip_layers, (str, type)) else list(skip_layers)
        for s in skip:
            if not isinstance(s, (str, type)):
                raise TypeError(f"skip_layers entries must be str or type, got {type(s).__name__}")
        if solve_dtype is not None and not (isinstance(solve_dtype, torch.dtype) and solve_dtype.is_floating_point):
            raise TypeError(f"solve_dtype must be a floating torch.dtype, got {solve_dtype!r}")
        helpers = check_overrides(layer_helpers)
        damping_scale = check("damping_scale", damping_scale, DampingScale)
        graft = check("graft", graft, GraftKind)
        beta2 = HyperParam("graft_beta2", graft_beta2, low=0.0, high=0.999999)(0)
        eps = HyperParam("graft_eps", graft_eps, low=0.0, low_open=True)(0)
        sharded_grads = check("sharded_grads", sharded_grads, ShardedGrads)
        if not isinstance(probe_layers, bool):
            raise TypeError(f"probe_layers must be a bool, got {type(probe_layers).__name__}")
        return cls(damping=damping_h, kl_clip=kl_clip_h, lr=lr_h, skip_layers=skip, loss_reduction=loss_reduction,
                   fisher=fisher, grad_scaler=grad_scaler, seed=seed, process_group=process_group,
                   solve_dtype=solve_dtype, layer_helpers=helpers, damping_scale=damping_scale,
                   collective_timeout=collective_timeout, graft=graft, graft_beta2=beta2, graft_eps=eps,
                   sharded_grads=sharded_grads, probe_layers=probe_layers, memory_budget=memory_budget)
