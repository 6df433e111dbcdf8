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
)
from cgfac.curvature.base import DeviceTraced, RankBounded, Scaled
from cgfac.distributed.collectives import WorkAssignment
from cgfac.layers import LayerHelper, Rows
from cgfac.layers.registry import HelperFactory
from cgfac.precondition import persist
from cgfac.precondition.memory import Block, BlockMemory, Budget, resolve_budget
from cgfac.precondition.settings import PreconditionerSettings
from cgfac.precondition.state import LayerState, StatsField
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

    Each keyword in full: [`PreconditionerSettings`][cgfac.precondition.settings.PreconditionerSettings].

    Args:
        model: the module to precondition (a ``DistributedDataParallel`` wrapper: layers named without ``module.``).
        damping: λ > 0, a float or a callable ``step -> float``.
        kl_clip: κ for the KL clip of the step, or None to disable it (applied after grafting).
        lr: the learning rate the optimizer will apply, used only by the KL clip.
        skip_layers: module names, class names (str) or classes left with their plain gradient.
        loss_reduction: "mean" (the loss averages per-sample losses) or "sum".
        fisher: "empirical" (``g`` from the user's backward) or "true" (from targets sampled by :meth:`sample_fisher`).
        grad_scaler: a ``torch.amp.GradScaler`` whose scale multiplies the captured gradients.
        seed: seeds the sampler of the true Fisher (each rank its own stream, :func:`rank_seed`).
        process_group: the ``torch.distributed`` group to work in (default: the world, when initialised).
        solve_dtype: dtype of curvature and solves (default: the parameters' dtype, at least float32).
        layer_helpers: ``{module type: factory}`` overriding the global registry for this preconditioner.
        damping_scale: "absolute" (every layer damped by λ), "relative" (by ``λ·tr(C_l)/dim``) or "rank".
        collective_timeout: seconds any collective may wait before it raises (default: the group's timeout).
        graft: "none", or "rmsprop": each layer's direction takes the length of RMSProp's step.
        graft_beta2: RMSProp's ``β₂`` (in ``[0, 1)``).
        graft_eps: RMSProp's ``ε`` (> 0).
        sharded_grads: how FSDP2's sharded gradients reach a layer's solve: "auto", "owner" or "all-gather".
        probe_layers: probe modules of unregistered types at registration; False: only registered types.
        memory_budget: the bytes the blocks' state may take (None: a share of the device's memory; ``math.inf``).

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
        damping: Hyper = 1e-3, kl_clip: Hyper | None = 1e-3, lr: Hyper = 0.1, skip_layers: Iterable[str | type] = (),
        loss_reduction: LossReduction = "mean", fisher: FisherKind = "empirical", grad_scaler: Any = None,
        seed: int = 0, process_group: Any = None, solve_dtype: torch.dtype | None = None,
        layer_helpers: Mapping[type, HelperFactory] | None = None, damping_scale: DampingScale = "absolute",
        collective_timeout: float | None = None, graft: GraftKind = "none", graft_beta2: float = 0.999,
        graft_eps: float = 1e-8, sharded_grads: ShardedGrads = "auto", probe_layers: bool = True,
        memory_budget: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        cfg = PreconditionerSettings.check(  # every keyword's check (cgfac.precondition.settings)
            damping=damping, kl_clip=kl_clip, lr=lr, skip_layers=skip_layers, loss_reduction=loss_reduction,
            fisher=fisher, grad_scaler=grad_scaler, seed=seed, process_group=process_group, solve_dtype=solve_dtype,
            layer_helpers=layer_helpers, damping_scale=damping_scale, collective_timeout=collective_timeout,
            graft=graft, graft_beta2=graft_beta2, graft_eps=graft_eps, sharded_grads=sharded_grads,
            probe_layers=probe_layers, memory_budget=memory_budget)
        # the public attributes, in the order they were always set (hyperparameters() lists them so)
        self.damping, self.kl_clip, self.lr = cfg.damping, cfg.kl_clip, cfg.lr
        self.loss_reduction, self.fisher, self.skip_layers = cfg.loss_reduction, cfg.fisher, cfg.skip_layers
        self.grad_scaler, self.solve_dtype, self.layer_helpers = cfg.grad_scaler, cfg.solve_dtype, cfg.layer_helpers
        self.damping_scale, self.graft, self.graft_beta2 = cfg.damping_scale, cfg.graft, cfg.graft_beta2
        self.graft_eps, self.sharded_grads, self.probe_layers = cfg.graft_eps, cfg.sharded_grads, cfg.probe_layers
        self.damping_offset = 0.0  # added to every layer's damping after scaling (cgfac.optim: weight decay)
        self.dist = WorkAssignment(process_group, collective_timeout)
        self.steps = self.fallbacks = self.skipped_steps = 0
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
        self.memory_budget: Budget = resolve_budget(memory_budget, next(iter(self.layers.values())).device,
                                                    trainable_bytes(model))
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
        """The dtype of a layer's curvature and solve: ``solve_dtype``, else the layer's, at least float32."""
        return compute_dtype(self.solve_dtype, helper.dtype)

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
        self.skipped_steps += 1  # counted before the warning, as a filter may raise it
        skip_batch(self.layers.values(), self.model.parameters(), self.grad_scaler, distributed=self.dist.active)

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

    stats = StatsField()
    """Per-layer statistics of the last step, a view of each :class:`LayerState`'s ``stats`` (assignable)."""

    def hyperparameters(self) -> dict[str, HyperParam]:
        """Every :class:`~cgfac.config.HyperParam` attribute by name, in the order they were
        set (``damping``, ``kl_clip``, ``lr``, ..., then a subclass's): what a checkpoint saves."""
        return {k: v for k, v in vars(self).items() if isinstance(v, HyperParam)}

    def layer_stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics of the last step (method, iterations, residual, damping, ...)."""
        return {name: plain_stats(st) for name, st in self.stats.items()}

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


def skip_batch(layers: Iterable[LayerHelper], parameters: Iterable[Tensor], grad_scaler: Any, *,
               distributed: bool) -> None:
    """:meth:`Preconditioner._skip_step`'s work: every layer's rows are discarded and, unless an enabled
    ``grad_scaler`` skips ``optimizer.step`` itself, every ``.grad`` is zeroed, with a warning."""
    for helper in layers:
        helper.discard_rows()
    if grad_scaler is not None and grad_scaler.is_enabled():
        return  # the scaler sees the non-finite gradients and skips optimizer.step itself
    for p in parameters:
        if p.grad is not None:
            p.grad.zero_()
    where = " (on this or another rank)" if distributed else ""
    warnings.warn(f"cgfac: non-finite gradient{where}; every .grad was zeroed and this step skipped",
                  RuntimeWarning, stacklevel=4)


def trainable_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s trainable parameters, each shared one counted once."""
    unique = {id(q): q for q in model.parameters() if q.requires_grad}.values()
    return sum(q.numel() * q.element_size() for q in unique)


def compute_dtype(solve_dtype: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """:meth:`Preconditioner.compute_dtype`: ``solve_dtype``, else ``dtype`` promoted to at least float32."""
    if solve_dtype is not None:
        return solve_dtype
    return torch.promote_types(dtype, torch.float32)


def plain_stats(st: dict[str, Any]) -> dict[str, Any]:
    """One layer's statistics with every 0-d tensor as a float (:meth:`Preconditioner.layer_stats`)."""
    return {key: float(value) if isinstance(value, Tensor) and value.dim() == 0 else value for key, value in st.items()}
