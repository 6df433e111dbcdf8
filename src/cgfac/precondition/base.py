"""The preconditioner base shared by CG-FAC and K-FAC: the step's data flow.

Use it between ``loss.backward()`` and ``optimizer.step()``: :meth:`Preconditioner.step`
replaces the ``.grad`` of every covered layer by its natural-gradient direction ``X`` (layer
matrix ``d_out × d_in``, bias last column), scaled by the KL clip

    ν = min(1, √(κ / |Σ_layers lr² ⟨X, ∇W⟩|))

(Ba et al. 2017; kfac-pytorch), when ``kl_clip = κ`` is set. Every other trainable module keeps
its plain gradient and is listed in :meth:`registration_report`.

The class strings collaborators together: :mod:`cgfac.capture.registration` (which module is covered, the
report), :mod:`cgfac.capture.capture` (what the hooks record, the true Fisher's sampling), a distribution
strategy of :mod:`cgfac.precondition.strategies` (everything that depends on processes and sharding), the
direction stages of :mod:`cgfac.precondition.transforms` (graft, KL clip, vanishing-step check) and
:mod:`cgfac.precondition.persist` (checkpoints). Subclasses supply the curvature (:meth:`Preconditioner._collect`)
and the solve (:meth:`Preconditioner._solve`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from cgfac.capture.capture import Recorder, rank_seed
from cgfac.capture.registration import ReportEntry, annotate, log_report, register, unwrap
from cgfac.config import (
    DampingScale,
    FisherKind,
    GraftKind,
    Hyper,
    HyperParam,
    LossReduction,
    LossType,
    ShardedGrads,
    check,
)
from cgfac.curvature.base import DeviceTraced, RankBounded, Scaled
from cgfac.distributed.collectives import WorkAssignment
from cgfac.layers import LayerHelper, Rows
from cgfac.layers.registry import HelperFactory, check_overrides
from cgfac.precondition import persist
from cgfac.precondition.memory import Block, BlockMemory, Budget, resolve_budget
from cgfac.precondition.state import LayerState, StateView
from cgfac.precondition.strategies import grads_finite, make_distribution
from cgfac.precondition.transforms import (
    DAMPING_SWAMPS,
    VANISHING_KL_SCALE,
    DirectionStage,
    Graft,
    KLClip,
    StepData,
    VanishingCheck,
)

__all__ = ["DAMPING_SWAMPS", "VANISHING_KL_SCALE", "Preconditioner", "ReportEntry", "layer_damping", "rank_seed",
           "unwrap"]


class Preconditioner:
    """Base of :class:`cgfac.CGFAC` and :class:`cgfac.KFAC`.

    Args:
        model: the module to precondition (a ``DistributedDataParallel`` wrapper works too; its
            layers are named as in the wrapped module, without the ``module.`` prefix).
        damping: λ > 0, a float or a callable ``step -> float``.
        kl_clip: κ for the KL clip of the step, or None to disable it (applied after grafting).
        lr: the learning rate the optimizer will apply, used only by the KL clip.
        skip_layers: module names, class names (str) or classes left with their plain gradient.
        loss_reduction: "mean" (the loss averages per-sample losses) or "sum".
        fisher: "empirical" (``g`` from the user's backward) or "true" (``g`` from targets
            sampled by :meth:`sample_fisher`; the user's backward only supplies ``∇W``).
        grad_scaler: a ``torch.amp.GradScaler`` whose scale multiplies the captured gradients
            (call ``scaler.unscale_(optimizer)`` before :meth:`step`).
        seed: seeds the sampler of the true Fisher; across processes each rank samples from its own
            stream (the ``rank``-th of ``world`` seeds drawn from a generator seeded with ``seed``,
            :func:`rank_seed`), so ranks never draw the same targets for their different samples.
        process_group: the ``torch.distributed`` group to work in (default: the world, when
            initialised); see :mod:`cgfac.distributed`.
        solve_dtype: dtype of curvature and solves (default: the parameters' dtype, at least
            float32). ``torch.float64`` when λ is tiny against the curvature's scale: a solve's
            relative error is about ``eps · (s_max + λ) / λ``.
        layer_helpers: ``{module type: factory}`` overriding the global registry
            (:func:`cgfac.register_layer_helper`) for this preconditioner; the most-derived
            registered class of a module wins, an override over a global entry at one class.
        damping_scale: "absolute" (every layer is damped by λ) or "relative": layer ``l`` is
            damped by ``λ·s_l``, ``s_l = tr(C_l)/dim`` the mean diagonal of its curvature
            (``tr(A)·tr(G)/(d_in·d_out)`` for a Kronecker block). Relative damping is unit-free
            and follows each layer's own scale: where back-propagated gradients shrink layer by
            layer (deep sigmoid networks), one absolute λ swamps the early layers' curvature.
            ``layer_stats()[name]`` has the layer's ``damping`` and ``curvature_scale``.
        collective_timeout: seconds any collective of the preconditioner may wait before it raises
            :class:`cgfac.distributed.collectives.CollectiveError` (default None: the process group's timeout).
        graft: "none", or "rmsprop": each layer's direction keeps its direction but takes the
            length of RMSProp's step ``‖∇W / (√v̂ + ε)‖`` (Shampoo's grafting, :mod:`cgfac.precondition.graft`),
            so the step no longer depends on the curvature's scale and ``lr`` is Adam-like
            (use ``kl_clip=None``). Tried on the transformer benchmark, where the KL-clipped step
            trailed AdamW.
        graft_beta2: RMSProp's ``β₂`` (in ``[0, 1)``).
        graft_eps: RMSProp's ``ε`` (> 0).
        sharded_grads: how FSDP2's sharded (``DTensor``) gradients reach a layer's solve
            (:mod:`cgfac.distributed.sharded`): ``"auto"`` (default) the owner scheme (the layer's owner alone
            gathers ``∇W`` from the shards and returns each rank its rows of the direction) wherever
            the gradients are ``Shard(0)`` on a 1-D mesh of the process group, else an all-gather
            on every rank with the reason logged once; ``"owner"``: the owner scheme or
            ``ValueError`` naming the layer; ``"all-gather"``: every rank all-gathers every layer.
            ``layer_stats()[name]["sharded"]`` says which. Plain gradients are unaffected.
        probe_layers: probe modules of unregistered types at registration (:mod:`cgfac.layers.probe`:
            a forward that is ``F.linear``, HF ``Conv1D``'s ``x @ weight + b``, ``F.embedding``, or a
            weight scaling an RMS/Layer-normalised input is covered); False: only registered types.
        memory_budget: the bytes the blocks' state may take (:mod:`cgfac.precondition.memory`): None (default)
            a quarter of the device's memory (CPU: total RAM; CUDA: the device's total memory) and
            at most 6× the trainable parameters' bytes (3× AdamW's state; never below 1 GB), a
            number ``≤ 1`` that fraction of the device's memory, a number ``> 1`` bytes, ``math.inf`` none. Every
            block's state is sized at registration, before anything is allocated
            (:attr:`memory_plan`); K-FAC gives blocks over the budget a cheaper form, and the
            registration report names each block's form, rule and bytes.

    Tied weights (a Parameter used by several covered modules, e.g. an embedding and the output
    head) are one block, ``"<first>+<other>"``, fed by the rows of every use
    (:mod:`cgfac.layers.tied`); the registration report names the modules that share it.

    Failure behaviour: a non-finite gradient anywhere in the model skips the step (every
    ``.grad`` is zeroed, ``skipped_steps`` counts it, a warning says so; with an enabled
    ``grad_scaler`` the gradients are left for the scaler, which skips the step itself). A layer
    whose curvature or solve is not usable keeps its plain gradient for the step (``fallbacks``
    counts it, a warning and ``layer_stats()[name]["fallback"]`` say why). Across processes both
    decisions are agreed on by every rank (a non-finite gradient on one rank skips the step on all).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Hyper = 1e-3,
        kl_clip: Hyper | None = 1e-3,
        lr: Hyper = 0.1,
        skip_layers: Iterable[str | type] = (),
        loss_reduction: LossReduction = "mean",
        fisher: FisherKind = "empirical",
        grad_scaler: Any = None,
        seed: int = 0,
        process_group: Any = None,
        solve_dtype: torch.dtype | None = None,
        layer_helpers: Mapping[type, HelperFactory] | None = None,
        damping_scale: DampingScale = "absolute",
        collective_timeout: float | None = None,
        graft: GraftKind = "none",
        graft_beta2: float = 0.999,
        graft_eps: float = 1e-8,
        sharded_grads: ShardedGrads = "auto",
        probe_layers: bool = True,
        memory_budget: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.damping = HyperParam("damping", damping, low=0.0, low_open=True)
        self.kl_clip = None if kl_clip is None else HyperParam("kl_clip", kl_clip, low=0.0, low_open=True)
        self.lr = HyperParam("lr", lr, low=0.0)
        self.loss_reduction: LossReduction = check("loss_reduction", loss_reduction, LossReduction)
        self.fisher: FisherKind = check("fisher", fisher, FisherKind)
        if isinstance(skip_layers, (str, type)):
            skip_layers = [skip_layers]
        self.skip_layers = list(skip_layers)
        for s in self.skip_layers:
            if not isinstance(s, (str, type)):
                raise TypeError(f"skip_layers entries must be str or type, got {type(s).__name__}")
        self.grad_scaler = grad_scaler
        if solve_dtype is not None and not (isinstance(solve_dtype, torch.dtype) and solve_dtype.is_floating_point):
            raise TypeError(f"solve_dtype must be a floating torch.dtype, got {solve_dtype!r}")
        self.solve_dtype = solve_dtype
        self.layer_helpers = check_overrides(layer_helpers)
        self.damping_scale: DampingScale = check("damping_scale", damping_scale, DampingScale)
        self.graft: GraftKind = check("graft", graft, GraftKind)
        self.graft_beta2 = HyperParam("graft_beta2", graft_beta2, low=0.0, high=0.999999)(0)
        self.graft_eps = HyperParam("graft_eps", graft_eps, low=0.0, low_open=True)(0)
        self.sharded_grads: ShardedGrads = check("sharded_grads", sharded_grads, ShardedGrads)
        if not isinstance(probe_layers, bool):
            raise TypeError(f"probe_layers must be a bool, got {type(probe_layers).__name__}")
        self.probe_layers = probe_layers
        self.damping_offset = 0.0  # added to every layer's damping after scaling (cgfac.optim: weight decay)
        self.dist = WorkAssignment(process_group, collective_timeout)
        self.steps = 0
        self.fallbacks = 0
        self.skipped_steps = 0
        self.capture = Recorder(fisher=self.fisher, loss_reduction=self.loss_reduction, grad_scaler=grad_scaler,
                                seed=seed, rank=self.dist.rank, world=self.dist.world, wants_rows=self._wants_rows,
                                limit=lambda: getattr(self, "curvature_samples", None))
        # The direction stages, applied by step() at their phase in this order (cgfac.precondition.transforms).
        self.grafting = Graft(self.graft, self.graft_beta2, self.graft_eps)
        self.clipping = KLClip(self.kl_clip, self.lr)
        self.vanishing = VanishingCheck(self.kl_clip)
        self.stages: list[DirectionStage] = [self.grafting, self.clipping, self.vanishing]
        self.model = model
        found = register(model, self.capture, skip_layers=self.skip_layers, layer_helpers=self.layer_helpers,
                         probe=self.probe_layers)
        self.layers: dict[str, LayerHelper] = found.layers
        self.report: list[ReportEntry] = found.report
        if not self.layers:
            raise ValueError("model: no covered layer with trainable parameters to precondition "
                             "(see cgfac.register_layer_helper)")
        first = next(iter(self.layers.values()))
        unique = {id(q): q for q in model.parameters() if q.requires_grad}.values()
        self.memory_budget: Budget = resolve_budget(memory_budget, first.device,
                                                    sum(q.numel() * q.element_size() for q in unique))
        # Sized before anything is allocated; may choose cheaper forms or raise ValueError (cgfac.precondition.memory).
        self.memory_plan: dict[str, BlockMemory] = self._plan_memory(
            {name: Block(h.structure, h.d_in, h.d_out, torch.finfo(self.compute_dtype(h)).bits // 8)
             for name, h in self.layers.items()})
        self.report = annotate(self.report, found.blocks, self.memory_plan)
        self._handles = [*found.handles, model.register_forward_pre_hook(self.capture.count_forward_pass)]
        self.states: dict[str, LayerState] = {name: self._new_state(helper) for name, helper in self.layers.items()}
        self.route = make_distribution(self)  # the distribution strategy (cgfac.precondition.strategies)
        log_report(type(self).__name__, self.report)

    reads_once = False  # whether step() in one process may read the device once (strategies.SingleProcess)

    # --- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Replace the ``.grad`` of every covered layer by its preconditioned direction.

        In one process (no sharded gradients) the step reads the device once: every decision
        that needs a value (finite gradients, rows and directions; the KL clip's products) and
        every statistic is gathered into one transfer after the solves
        (:meth:`cgfac.precondition.strategies.SingleProcess.read_back`),
        and the writes follow it. CG's iterations read their residuals (a direct solver's
        don't); with ``graft`` and ``kl_clip`` both set the grafted products take a second read.
        Across processes the decisions are agreed by collectives as they arise."""
        with record_function("cgfac.precondition"):
            step = StepData(self.damping(self.steps), self.steps, self.stats, holds=self.route.holds)
            self.capture.sample_targets = []
            if not self.route.agree(step):  # every layer's ∇W (a non-finite one anywhere skips the step)
                return self._skip_step()
            with record_function("cgfac.rows"):
                self._collect(step.active)  # this step's rows into each layer's curvature
            self.route.gather(step)  # ∇W to where the layer is solved
            for name, (helper, grad) in step.active.items():
                if self.route.solves_here(name):
                    step.directions[name] = self.route.check(step, name, self._solve_layer(step, name, helper, grad))
            settled = self.route.settle(step)  # the checks left open (one device read); False: skip
            if step.undo:
                self._collect_undo(step.undo)  # rows found non-finite after the fact, or a skipped step's
            if not settled:
                return self._skip_step()
            for name, x in step.directions.items():
                if x is None and "fallback" in step.stats[name]:
                    self._fell_back(name, step.stats[name]["fallback"])
            self.route.share(step)  # owners' directions to the ranks that write them
            for stage in self.stages:
                if stage.phase == "held":
                    stage.apply(step)
            self.route.scatter(step)  # what each rank writes, with ⟨X, ∇W⟩
            for stage in self.stages:
                if stage.phase == "final":
                    stage.apply(step)
            with record_function("cgfac.write"):
                self.route.write(step)
            for stage in self.stages:
                if stage.phase == "written":
                    stage.apply(step)
            self.steps += 1
        return None

    def _solve_layer(self, step: StepData, name: str, helper: LayerHelper, grad: Tensor) -> Tensor | None:
        """One layer's :meth:`_solve`, unless it already fell back; a failed factorisation falls back."""
        st = step.stats[name]
        with record_function("cgfac.solve"):
            try:
                return None if "fallback" in st else self._solve(name, helper, grad, step.damping)
            except torch.linalg.LinAlgError as err:
                st["fallback"] = f"solve failed: {err}"
                return None

    # --- what subclasses define ---------------------------------------------------------------
    def _plan_memory(self, blocks: dict[str, Block]) -> dict[str, BlockMemory]:
        """Each block's planned state (:mod:`cgfac.precondition.memory`), sized from ``blocks`` before anything is
        allocated; subclasses size their own state and may choose cheaper forms."""
        return {}

    def _new_state(self, helper: LayerHelper) -> LayerState:
        """A block's empty state (subclasses add their curvature state)."""
        return LayerState(helper)

    def _wants_rows(self) -> bool:
        """Whether this step's forward passes should record curvature rows."""
        return True

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Fold this step's rows into each layer's curvature (with any communication)."""
        raise NotImplementedError

    def _collect_undo(self, names: list[str]) -> None:
        """Forget the rows this step's :meth:`_collect` added to these layers' curvature (a
        skipped step, or rows found non-finite after the fact)."""

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        """The layer's natural-gradient direction ``X`` (``d_out × d_in``), or None to keep ∇W."""
        raise NotImplementedError

    def owner_only(self, name: str) -> bool:
        """Whether only the owner computes this layer's direction (so it must be broadcast)."""
        return True

    # --- helpers of the step ------------------------------------------------------------------
    def compute_dtype(self, helper: LayerHelper) -> torch.dtype:
        """The dtype of a layer's curvature and solve: ``solve_dtype``, else the layer's dtype
        promoted to at least float32."""
        if self.solve_dtype is not None:
            return self.solve_dtype
        return torch.promote_types(helper.dtype, torch.float32)

    def _rows(self, helper: LayerHelper, max_samples: int | None = None) -> Rows | None:
        """This step's rows for a layer, in the compute dtype, unscaled by any GradScaler."""
        return self.capture.rows(helper, self.compute_dtype(helper), max_samples)

    def _layer_damping(self, name: str, damping: float, curvature: Scaled) -> float:
        """The damping of one layer's solve (:func:`layer_damping`), recorded in its stats."""
        return layer_damping(self.stats.setdefault(name, {}), damping, curvature, self.damping_scale,
                             self.damping_offset, deferred=self.route.defers)

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite (:func:`cgfac.precondition.strategies.grads_finite`)."""
        return bool(grads_finite(self.model.parameters()))

    def _skip_step(self) -> None:
        """A non-finite gradient: nothing of this batch is kept, and no parameter may move by it."""
        for helper in self.layers.values():
            helper.discard_rows()
        self.skipped_steps += 1
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            return  # the scaler sees the non-finite gradients and skips optimizer.step itself
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        where = " (on this or another rank)" if self.dist.active else ""
        warnings.warn(f"cgfac: non-finite gradient{where}; every .grad was zeroed and this step skipped",
                      RuntimeWarning, stacklevel=3)

    def _fell_back(self, name: str, reason: str) -> None:
        """Count and warn: layer ``name`` keeps its plain gradient this step."""
        self.fallbacks += 1
        warnings.warn(f"cgfac: layer {name!r} keeps its plain gradient this step: {reason}", RuntimeWarning,
                      stacklevel=4)

    # --- state and statistics -----------------------------------------------------------------
    def _state(self, name: str) -> LayerState:
        """The state of block ``name``; one without a helper is made for a name solved directly."""
        if name not in self.states:
            self.states[name] = LayerState(None)
        return self.states[name]

    @property
    def stats(self) -> StateView:
        """Per-layer statistics of the last step, a view of each :class:`LayerState`'s ``stats``."""
        return StateView(lambda: self.states, lambda s: s.stats, lambda s, v: setattr(s, "stats", v))

    @stats.setter
    def stats(self, value: Mapping[str, dict[str, Any]]) -> None:
        for state in self.states.values():
            state.stats = None
        for name, st in value.items():
            self._state(name).stats = st

    def hyperparameters(self) -> dict[str, HyperParam]:
        """Every :class:`~cgfac.config.HyperParam` attribute by name, in the order they were
        set (``damping``, ``kl_clip``, ``lr``, ..., then a subclass's): what a checkpoint saves."""
        return {k: v for k, v in vars(self).items() if isinstance(v, HyperParam)}

    def layer_stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics of the last step (method, iterations, residual, damping, ...)."""
        return {k: {key: float(value) if isinstance(value, Tensor) and value.dim() == 0 else value
                    for key, value in v.items()} for k, v in self.stats.items()}

    def registration_report(self) -> list[ReportEntry]:
        """Every module with trainable parameters of its own, covered or not, and why."""
        return list(self.report)

    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes the next step; tensors are referenced, as in ``torch.optim``.

        Only tensors and plain Python values: it loads with ``torch.load(weights_only=True)``.
        Across processes this is *this rank's* state (a layer's curvature lives on its owner):
        it resumes on the same number of processes. :func:`cgfac.checkpoint.full_state_dict`
        assembles the state of every rank into one that loads on any number of processes."""
        return persist.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` or a :func:`cgfac.checkpoint.full_state_dict`.

        A full state (or one saved by a single process) loads on any number of processes: every
        rank takes every layer's state and, once owners are assigned at the next step, keeps
        only its own layers'. One rank's own state from ``N > 1`` processes loads only on ``N``
        processes, into the same rank. A state of another class or model raises ``ValueError``.
        Random streams of the true Fisher: each rank continues its own where the saved state
        has one for it (same number of processes); otherwise it starts a fresh stream from the
        saved seed generator (:meth:`sampling_generator`)."""
        persist.load_state_dict(self, state)

    # --- capture (cgfac.capture) --------------------------------------------------------------
    def sample_fisher(self, outputs: Tensor, loss_type: LossType, *, targets: Tensor | None = None) -> None:
        """True Fisher: sample targets from ``outputs`` and back-propagate them once.

        Captures ``g`` for every covered layer without touching any ``.grad`` (the graph is
        retained for the user's own ``loss.backward()``). ``loss_type``: one of
        ``"cross_entropy"``, ``"gaussian"``/``"mse"``, ``"bernoulli"``. ``targets``: sampled targets
        to use instead (as :func:`cgfac.losses.sample_targets` returns them), e.g. to replay a draw.

        The sampled backward is ``torch.autograd.grad`` with respect to the covered layers' outputs
        (and the parameters of units captured otherwise): no ``.grad`` is written and no
        gradient-accumulation hook runs, so ``DistributedDataParallel`` does not all-reduce, and
        its buckets are left for the user's own backward.
        """
        self.capture.sample_fisher(outputs, loss_type, self.layers.values(), targets=targets)

    def sampling_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator :meth:`sample_fisher` draws targets with on ``device``
        (:meth:`cgfac.capture.capture.Recorder.sampling_generator`)."""
        return self.capture.sampling_generator(device)

    def capture_limit(self) -> int | None:
        """Batch entries of each forward call whose rows are kept (``curvature_samples``; None: all)."""
        return self.capture.capture_limit()

    def discard_captured(self) -> None:
        """Forget the rows captured since the last step (e.g. of an evaluation-only backward)."""
        self.capture.discard(self.layers.values())

    def remove(self) -> None:
        """Remove every hook; the preconditioner captures nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.capture.discard(self.layers.values())

    def __enter__(self) -> Preconditioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def layer_damping(st: dict[str, Any], damping: float, curvature: Scaled, damping_scale: DampingScale, offset: float,
                  *, deferred: bool) -> Any:
    """The damping of one layer's solve: ``λ`` (absolute) or ``λ·s_l`` (relative, ``s_l`` from
    ``curvature.mean_diagonal()``; "rank": by the curvature's rank bound), plus ``offset``
    (:attr:`Preconditioner.damping_offset`); recorded in the layer's stats ``st``. ``deferred``
    (the one-read step): computed on the device, without a host read, where the block has its trace
    there (:class:`~cgfac.curvature.base.DeviceTraced`)."""
    lam: Any = damping
    if damping_scale != "absolute" and deferred and isinstance(curvature, DeviceTraced):
        dims = curvature.shape[0] * curvature.shape[1]
        scale_t = curvature.trace_tensor() / (dims if damping_scale == "relative" else curvature.rank_bound())
        ok = torch.isfinite(scale_t) & (scale_t > 0)
        lam = torch.where(ok, damping * scale_t, torch.full_like(scale_t, damping))  # no host read
        st["curvature_scale"] = scale_t
    elif damping_scale != "absolute":
        scale = curvature.mean_diagonal()
        if damping_scale == "rank" and isinstance(curvature, RankBounded):
            scale *= curvature.shape[0] * curvature.shape[1] / curvature.rank_bound()
        if math.isfinite(scale) and scale > 0:
            lam = damping * scale
            st["curvature_scale"] = scale
        else:
            st["curvature_scale"] = f"{scale} (not positive: absolute damping this step)"
    lam = lam + offset
    st["damping"] = lam
    return lam
