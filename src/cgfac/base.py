"""The preconditioner base shared by CG-FAC and K-FAC: hooks, step, KL clip, reports, state.

Use it between ``loss.backward()`` and ``optimizer.step()``: :meth:`Preconditioner.step`
replaces the ``.grad`` of every covered layer by its natural-gradient direction ``X`` (layer
matrix ``d_out × d_in``, bias last column), scaled by the KL clip

    ν = min(1, √(κ / |Σ_layers lr² ⟨X, ∇W⟩|))

(Ba et al. 2017; kfac-pytorch), when ``kl_clip = κ`` is set. Every other trainable module keeps
its plain gradient and is listed in :meth:`registration_report`.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from cgfac import sharded
from cgfac.curvature.kron import deferred_checks
from cgfac.distributed import WorkAssignment
from cgfac.fisher import sampled_loss
from cgfac.graft import RMSPropGraft
from cgfac.hyperparams import Hyper, HyperParam
from cgfac.layers import Chunk, LayerHelper, Rows, TiedHelper, make_helper, tie_reason
from cgfac.layers.registry import HelperFactory, check_overrides
from cgfac.options import DampingScale, FisherKind, GraftKind, LossReduction, LossType, ShardedGrads, check
from cgfac.state import LayerState, StateView

logger = logging.getLogger("cgfac")
VANISHING_KL_SCALE = 1e-3  # a KL clip scaling the step by less than this makes it vanish
DAMPING_SWAMPS = 1e3  # damping above this multiple of the largest curvature eigenvalue swamps it
# How a layer's gradient reaches its solve this step, agreed by the maximum over ranks: the owner
# scheme for row-sharded gradients, the whole matrix on every rank, or missing (plain gradient).
_OWNER, _WHOLE, _MISSING = 0, 1, 2


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (any nesting).

    A compiled model works: the hooks sit on the original modules, which the compiled forward
    traces (TorchDynamo inlines module forward hooks; the tensor hooks on layer outputs run in
    the backward), so the rows and directions are the eager ones (tested with the ``aot_eager``
    and ``inductor`` backends)."""
    for _ in range(8):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            break
    return model


def rank_seed(generator: torch.Generator, rank: int, world: int) -> int:
    """The seed of rank ``rank``'s sampling stream: the ``rank``-th of ``world`` numbers drawn from
    ``generator`` (which advances identically on every rank). One process draws one number, the
    seed it always used."""
    return int(torch.randint(2**62, (world,), generator=generator)[rank])


@dataclass(frozen=True)
class ReportEntry:
    """One trainable module: whether it is preconditioned, and if not, why."""

    name: str
    module_type: str
    covered: bool
    reason: str
    rule: str = ""  # which rule covered it: "registered:<class>", "layer_helpers[<class>]", "probe:<kind>", "tied"

    def __str__(self) -> str:
        status = "preconditioned" if self.covered else "plain gradient"
        rule = f" [{self.rule}]" if self.rule else ""
        return f"{self.name or '<root>'} ({self.module_type}): {status}{rule}: {self.reason}"


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
            :class:`cgfac.distributed.CollectiveError` (default None: the process group's timeout).
        graft: "none", or "rmsprop": each layer's direction keeps its direction but takes the
            length of RMSProp's step ``‖∇W / (√v̂ + ε)‖`` (Shampoo's grafting, :mod:`cgfac.graft`),
            so the step no longer depends on the curvature's scale and ``lr`` is Adam-like
            (use ``kl_clip=None``). Tried on the transformer benchmark, where the KL-clipped step
            trailed AdamW.
        graft_beta2, graft_eps: RMSProp's ``β₂`` (in ``[0, 1)``) and ``ε`` (> 0).
        sharded_grads: how FSDP2's sharded (``DTensor``) gradients reach a layer's solve
            (:mod:`cgfac.sharded`): ``"auto"`` (default) the owner scheme (the layer's owner alone
            gathers ``∇W`` from the shards and returns each rank its rows of the direction) wherever
            the gradients are ``Shard(0)`` on a 1-D mesh of the process group, else an all-gather
            on every rank with the reason logged once; ``"owner"``: the owner scheme or
            ``ValueError`` naming the layer; ``"all-gather"``: every rank all-gathers every layer.
            ``layer_stats()[name]["sharded"]`` says which. Plain gradients are unaffected.
        probe_layers: probe modules of unregistered types at registration (:mod:`cgfac.layers.probe`:
            a forward that is ``F.linear``, HF ``Conv1D``'s ``x @ weight + b``, ``F.embedding``, or a
            weight scaling an RMS/Layer-normalised input is covered); False: only registered types.

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
        self._owner_routed: set[str] = set()  # this step's layers under the owner scheme (cgfac.sharded)
        self._sharded_notes: dict[str, str] = {}  # the last logged route of each sharded layer
        self.damping_offset = 0.0  # added to every layer's damping after scaling (cgfac.optim: weight decay)
        # During a one-read step (_step_local): the 0-dim tensors to read back once, by (layer, what).
        self._pending: dict[tuple[str, str], Tensor] | None = None
        self._forward_passes = 0
        self.dist = WorkAssignment(process_group, collective_timeout)
        self.steps = 0
        self.states: dict[str, LayerState] = {}
        self.fallbacks = 0
        self.skipped_steps = 0
        self._warned_vanishing = False
        self._sampling = False
        self._sample_targets: list[tuple[list[LayerHelper], Tensor]] = []  # fisher="true": layer outputs
        self._generator = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.model = model
        self.layers: dict[str, LayerHelper] = {}
        self.report: list[ReportEntry] = []
        self._register(model)
        if not self.layers:
            raise ValueError("model: no covered layer with trainable parameters to precondition "
                             "(see cgfac.register_layer_helper)")
        self.states = {name: self._new_state(helper) for name, helper in self.layers.items()}
        self._log_report()

    _reads_once = False  # whether step() in one process may take the one-read path (_step_local)

    def _new_state(self, helper: LayerHelper) -> LayerState:
        """A block's empty state (subclasses add their curvature state)."""
        return LayerState(helper)

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

    # --- registration -----------------------------------------------------------------------
    def _skipped(self, name: str, module: nn.Module) -> bool:
        for s in self.skip_layers:
            if isinstance(s, type) and isinstance(module, s):
                return True
            if isinstance(s, str) and (s == name or s == type(module).__name__ or re.fullmatch(s, name)):
                return True
        return False

    def _register(self, model: nn.Module) -> None:
        """Every module with trainable parameters of its own: its helper (one or more units, each
        a block solved on its own), or the reason it keeps its plain gradient."""
        self._handles = []
        claimed: dict[int, tuple[str, bool]] = {}  # child module id -> (parent name, parent covered)
        entries: list[tuple[str, nn.Module, Any]] = []
        skipped_params: dict[int, str] = {}  # parameter id -> the skipped module using it
        # Layers are named as in the unwrapped model, so names (and checkpoints) are the same with
        # and without DistributedDataParallel (on any number of processes) and torch.compile.
        root = unwrap(model)
        for name, module in root.named_modules():
            kind = type(module).__name__
            if id(module) in claimed:
                parent, ok = claimed[id(module)]
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    reason = f"covered by {parent!r}" if ok else f"part of {parent!r}, which is not preconditioned"
                    self.report.append(ReportEntry(name, kind, ok, reason))
                continue
            helper = make_helper(name, module, self.layer_helpers, probe=self.probe_layers)
            if helper is None:
                continue
            if isinstance(helper, str):
                self.report.append(ReportEntry(name, kind, False, helper))
                continue
            skipped = self._skipped(name, module)
            for child in helper.claims():
                claimed[id(child)] = (name, not skipped)
            if skipped:
                self.report.append(ReportEntry(name, kind, False, "in skip_layers"))
                skipped_params.update({id(p): name for unit in helper.units() for p in unit.params()})
                continue
            entries.append((name, module, helper))
        # A module sharing a Parameter with a skipped one (directly, or through other modules): that
        # .grad holds the skipped module's share, which no block of ours can own.
        with_skipped: dict[str, str] = {}
        changed = bool(skipped_params)
        while changed:
            changed = False
            for name, _, helper in entries:
                ids = {id(p) for unit in helper.units() for p in unit.params()}
                hit = next((skipped_params[i] for i in ids if i in skipped_params), None)
                if hit is not None and name not in with_skipped:
                    with_skipped[name] = hit
                    skipped_params.update({i: hit for i in ids})
                    changed = True
        tied, uncovered = self._tie([e for e in entries if e[0] not in with_skipped])
        for name, skipped_name in with_skipped.items():
            uncovered[name] = (f"shares a Parameter with {skipped_name!r}, which is in skip_layers (or shares one "
                               "with it): plain gradient")
        for name, module, helper in entries:
            kind = type(module).__name__
            if name in uncovered:
                self.report.append(ReportEntry(name, kind, False, uncovered[name]))
                continue
            if name in tied:
                block = tied[name]
                if block is None:  # a later use of a tied block: registered with its first use
                    continue
                for use in block.uses:
                    use_kind = type(use.helper.module).__name__
                    others = ", ".join(repr(u.name) for u in block.uses if u.name != use.name)
                    self.report.append(ReportEntry(
                        use.name, use_kind, True, f"shares its weight with {others}: {block.describe()}",
                        f"tied ({use.helper.rule or 'registered'})"))
                self.layers[block.name] = block
                self._handles += block.attach(self)
                continue
            for unit in helper.units():
                self.layers[unit.name] = unit
            self.report.append(ReportEntry(name, kind, True, helper.describe(), helper.rule))
            self._handles += helper.attach(self)
        if self.layers:
            self._handles.append(model.register_forward_pre_hook(self._count_forward_pass))

    @staticmethod
    def _tie(entries: list[tuple[str, nn.Module, Any]]) -> tuple[dict[str, TiedHelper | None], dict[str, str]]:
        """Modules whose parameters another covered module also uses (a tied embedding and output
        layer, any weight shared between layers): ``{first use: TiedHelper, later use: None}`` for
        the groups that form one block (:mod:`cgfac.layers.tied`), and the reason of the others
        (two layer matrices of one Parameter cannot both replace its gradient)."""
        owner: dict[int, int] = {}  # parameter id -> group (union of entries sharing parameters)
        parent = list(range(len(entries)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, (_, _, helper) in enumerate(entries):
            for p in {id(p): p for unit in helper.units() for p in unit.params()}:
                if p in owner:
                    parent[find(i)] = find(owner[p])
                else:
                    owner[p] = i
        groups: dict[int, list[int]] = {}
        for i in range(len(entries)):
            groups.setdefault(find(i), []).append(i)
        tied: dict[str, TiedHelper | None] = {}
        uncovered: dict[str, str] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            names = [entries[i][0] for i in members]
            helpers = [entries[i][2] for i in members]
            single = all(isinstance(h, LayerHelper) and h.units() == [h] for h in helpers)
            reason = tie_reason(helpers) if single else "a module with several blocks shares a Parameter"
            if reason is None:
                block = TiedHelper("+".join(names), list(zip(names, helpers)))
                tied[names[0]] = block
                tied.update({n: None for n in names[1:]})
                continue
            for n in names:
                others = ", ".join(repr(o) for o in names if o != n)
                uncovered[n] = (f"shares a Parameter with {others}, which cannot be one block ({reason}): "
                                "plain gradient")
        return tied, uncovered

    def _log_report(self) -> None:
        logger.info("%s registration:\n  %s", type(self).__name__, "\n  ".join(map(str, self.report)))
        plain = [e for e in self.report if not e.covered]
        if plain:
            logger.warning(
                "%s: %d trainable module(s) keep their plain gradient: %s",
                type(self).__name__, len(plain), "; ".join(map(str, plain)),
            )

    def registration_report(self) -> list[ReportEntry]:
        """Every module with trainable parameters of its own, covered or not, and why."""
        return list(self.report)

    # --- capture ------------------------------------------------------------------------------
    def _wants_rows(self) -> bool:
        """Whether this step's forward passes should record curvature rows."""
        return True

    def _count_forward_pass(self, module: nn.Module, inputs: tuple) -> None:
        self._forward_passes += 1

    def capturing(self, module: nn.Module) -> bool:
        """Whether a forward call of ``module`` now should record curvature rows."""
        return module.training and torch.is_grad_enabled() and self._wants_rows()

    def capture_limit(self) -> int | None:
        """Batch entries of each forward call whose rows are kept (``curvature_samples``; None:
        all): rows are built for those only (:meth:`LayerHelper.batch_size`)."""
        return getattr(self, "curvature_samples", None)

    def record_input(self, unit: LayerHelper, a: Tensor, n: int, *, n_full: int | None = None,
                     batch: int | None = None) -> Chunk:
        """A forward call's input rows of one unit: ``n`` samples of the call's ``n_full`` (the
        rows of its first ``batch`` batch entries); its output gradient is paired later."""
        chunk = Chunk(a=a, n=n, forward_pass=self._forward_passes, n_full=n_full or n, batch=batch or n)
        unit.chunks.append(chunk)
        return chunk

    def record_output(self, units: list[LayerHelper], output: Tensor) -> None:
        """A forward call's output whose gradient gives these units' ``g`` (through a tensor hook):
        the sampled backward of the true Fisher asks for the gradients of these outputs instead of
        the parameters', so no weight gradient is computed for them."""
        if self.fisher == "true":
            self._sample_targets.append((units, output))

    def record_output_grad(self, unit: LayerHelper, chunk: Chunk, g: Tensor) -> None:
        """Output-gradient rows of a chunk (summed over backward passes)."""
        if self.fisher == "true" and not self._sampling:
            return  # the user's backward only supplies ∇W
        if self._sampling:
            g = g * chunk.n_full  # the sampled loss is a mean over this forward call's samples
            chunk.per_sample = True
        chunk.g = g if chunk.g is None else chunk.g + g

    def sampling_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator :meth:`sample_fisher` draws targets with on ``device``: seeded, on first
        use, by the ``rank``-th of ``world`` numbers drawn from the generator seeded with ``seed``
        (:func:`rank_seed`), so every rank has its own stream and one process has the stream it
        always had."""
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(rank_seed(self._generator, self.dist.rank, self.dist.world))
            self._generators[key] = gen
        return self._generators[key]

    def sample_fisher(self, outputs: Tensor, loss_type: LossType, *, targets: Tensor | None = None) -> None:
        """True Fisher: sample targets from ``outputs`` and back-propagate them once.

        Captures ``g`` for every covered layer without touching any ``.grad`` (the graph is
        retained for the user's own ``loss.backward()``). ``loss_type``: one of
        ``"cross_entropy"``, ``"gaussian"``/``"mse"``, ``"bernoulli"``. ``targets``: sampled targets
        to use instead (as :func:`cgfac.fisher.sample_targets` returns them), e.g. to replay a draw.

        The sampled backward is ``torch.autograd.grad`` with respect to the covered layers' outputs
        (and the parameters of units captured otherwise): no ``.grad`` is written and no
        gradient-accumulation hook runs, so ``DistributedDataParallel`` does not all-reduce, and
        its buckets are left for the user's own backward.
        """
        if self.fisher != "true":
            raise ValueError("sample_fisher needs fisher='true' at construction")
        check("loss_type", loss_type, LossType)
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor or None, got {type(targets).__name__}")
        gen = self.sampling_generator(outputs.device) if targets is None else None
        loss = sampled_loss(outputs, loss_type, gen, targets)
        # Back-propagate to the covered layers' outputs (their tensor hooks record g) and, for
        # units captured another way (attention's projections), to their parameters.
        wrt: list[Tensor] = []
        by_output: set[int] = set()
        for units, out in self._sample_targets:
            if out.requires_grad:
                wrt.append(out)
                by_output.update(id(u) for u in units)
        self._sample_targets = []
        params = {id(p): p for h in self.layers.values() for u in h.units() if id(u) not in by_output
                  for p in u.sampling_params()}
        wrt.extend(params.values())
        self._sampling = True
        try:
            with record_function("cgfac.sampled_backward"):
                torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False

    # --- the step -----------------------------------------------------------------------------
    def _compute_dtype(self, helper: LayerHelper) -> torch.dtype:
        if self.solve_dtype is not None:
            return self.solve_dtype
        return torch.promote_types(helper.dtype, torch.float32)

    def _rows(self, helper: LayerHelper, max_samples: int | None = None) -> Rows | None:
        """This step's rows for a layer, in the compute dtype, unscaled by any GradScaler."""
        rows = helper.take_rows(mean_reduced=self.loss_reduction == "mean", max_samples=max_samples)
        if rows is None:
            return None
        dtype = self._compute_dtype(helper)
        g = rows.g.to(dtype)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            g = g / self.grad_scaler.get_scale()
        return Rows(a=rows.a.to(dtype), g=g, n=rows.n)

    def _layer_damping(self, name: str, damping: float, curvature: Any) -> float:
        """The damping of one layer's solve: ``λ`` (absolute) or ``λ·s_l`` (relative, ``s_l`` from
        ``curvature.mean_diagonal()``), plus :attr:`damping_offset`; recorded in ``stats``."""
        st = self.stats.setdefault(name, {})
        lam: Any = damping
        if self.damping_scale != "absolute" and self._pending is not None and hasattr(curvature, "trace_tensor"):
            dims = curvature.shape[0] * curvature.shape[1]
            scale_t = curvature.trace_tensor() / (dims if self.damping_scale == "relative" else curvature.rank_bound())
            ok = torch.isfinite(scale_t) & (scale_t > 0)
            lam = torch.where(ok, damping * scale_t, torch.full_like(scale_t, damping))  # no host read
            st["curvature_scale"] = scale_t
        elif self.damping_scale != "absolute":
            scale = curvature.mean_diagonal()
            if self.damping_scale == "rank" and hasattr(curvature, "rank_bound"):
                scale *= curvature.shape[0] * curvature.shape[1] / curvature.rank_bound()
            if math.isfinite(scale) and scale > 0:
                lam = damping * scale
                st["curvature_scale"] = scale
            else:
                st["curvature_scale"] = f"{scale} (not positive: absolute damping this step)"
        lam = lam + self.damping_offset
        st["damping"] = lam
        return lam

    def _no_rows_reason(self) -> str:
        hint = "call sample_fisher(outputs, loss_type) before backward" if self.fisher == "true" else (
            "no forward and backward in train mode with grad enabled")
        return f"no curvature rows captured ({hint})"

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Fold this step's rows into each layer's curvature (with any communication)."""
        raise NotImplementedError

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        """The layer's natural-gradient direction ``X`` (``d_out × d_in``), or None to keep ∇W."""
        raise NotImplementedError

    def _solves_here(self, name: str) -> bool:
        """Whether this process computes the layer's direction (under the owner scheme for sharded
        gradients only the owner holds the whole ``∇W``)."""
        if name in self._owner_routed:
            return self.dist.owns(name)
        return not self._owner_only(name) or self.dist.owns(name)

    def _share(self, directions: dict[str, Tensor | None], active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Broadcast owner-computed directions; a flag carries "keep the plain gradient"."""
        if not self.dist.active:
            return
        items, buffers = [], {}
        for name, (_, grad) in active.items():
            if not self._owner_only(name) or name in self._owner_routed:
                continue
            buf = grad.new_zeros(grad.numel() + 1)
            x = directions.get(name)
            if x is not None:
                buf[:-1] = x.reshape(-1)
                buf[-1] = 1
            buffers[name] = buf
            items.append((self.dist.owner(name), [buf]))
        self.dist.broadcast_from_owners(items)
        for name, buf in buffers.items():
            grad = active[name][1]
            directions[name] = buf[:-1].reshape(grad.shape) if buf[-1] == 1 else None

    def _owner_only(self, name: str) -> bool:
        """Whether only the owner computes this layer's direction (so it must be broadcast)."""
        return True

    def _grads_finite(self) -> bool:
        """One reduction over every gradient (float32 sums: a float16 sum must not overflow)."""
        return bool(self._grads_finite_tensor())

    def _skip_step(self) -> None:
        """A non-finite gradient: nothing of this batch is kept, and no parameter may move by it."""
        for helper in self.layers.values():
            helper.chunks = []
        self.skipped_steps += 1
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            return  # the scaler sees the non-finite gradients and skips optimizer.step itself
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        where = " (on this or another rank)" if self.dist.active else ""
        warnings.warn(f"cgfac: non-finite gradient{where}; every .grad was zeroed and this step skipped",
                      RuntimeWarning, stacklevel=3)

    def _local_route(self, helper: LayerHelper) -> tuple[int, Any]:
        """This rank's view of how a unit's gradient reaches its solve: ``(_MISSING, None)``,
        ``(_OWNER, row layouts of its parts)`` or ``(_WHOLE, why not the owner scheme, or None
        for plain gradients)``."""
        parts = helper.grad_parts()
        if any(p.grad is None for p, _ in parts):
            return _MISSING, None
        if not any(sharded.is_sharded(p.grad) for p, _ in parts):
            return _WHOLE, None
        if not self.dist.active:
            return _WHOLE, "one process"
        if self.sharded_grads == "all-gather":
            return _WHOLE, "sharded_grads='all-gather'"
        layouts = []
        for k, (p, _) in enumerate(parts):
            layout = sharded.row_layout(cast(Tensor, p.grad), self.dist.group_ranks, self.dist.rank)
            if isinstance(layout, str):
                return _WHOLE, f"{'weight' if k == 0 else f'parameter {k}'} gradient {layout}"
            layouts.append(layout)
        return _OWNER, layouts

    def _note_route(self, name: str, route: str) -> None:
        """Record a sharded layer's route in its stats; log it when it changes."""
        self.stats[name]["sharded"] = route
        if self._sharded_notes.get(name) != route:
            self._sharded_notes[name] = route
            chosen = route.startswith("owner") or "sharded_grads='all-gather'" in route or not self.dist.active
            log = logger.info if chosen else logger.warning
            log("%s: layer %r: sharded gradient by %s", type(self).__name__, name, route)

    def _agreed_grads(self) -> tuple[bool, dict[str, Tensor | None], dict[str, list], dict[str, str]]:
        """Whether every rank's gradients are finite; each layer's whole ``∇W`` (None where any
        rank lacks it, or where the layer goes by the owner scheme); the row layouts of the layers
        that go by the owner scheme; and why each other sharded layer does not. One all-reduce
        makes these decisions the same on every rank; then sharded layers not under the owner
        scheme are all-gathered (layers in the same order everywhere)."""
        routes = {name: self._local_route(helper) for name, helper in self.layers.items()}
        finite = self._grads_finite()
        flags = [route for route, _ in routes.values()]
        if self.dist.active:
            device = next(iter(self.layers.values())).device
            agreed = self.dist.agree([int(not finite), *flags], device)
            finite, flags = not agreed[0], agreed[1:]
        grads: dict[str, Tensor | None] = {}
        layouts: dict[str, list] = {}
        reasons: dict[str, str] = {}
        if not finite:
            return False, grads, layouts, reasons
        for (name, helper), flag, (mine, info) in zip(self.layers.items(), flags, routes.values()):
            grads[name] = None
            if flag == _OWNER:
                layouts[name] = info
                continue
            if flag == _WHOLE:
                reason = info if mine == _WHOLE else "not row-sharded as the owner scheme needs on another rank"
                if reason is not None and self.dist.active and self.sharded_grads == "owner":
                    raise ValueError(f"sharded_grads='owner': layer {name!r} cannot use the owner scheme: {reason} "
                                     "(sharded_grads='auto' all-gathers such layers)")
                grads[name] = helper.grad_matrix()
                if reason is not None:
                    reasons[name] = reason
        return True, grads, layouts, reasons

    @torch.no_grad()
    def step(self) -> None:
        """Replace the ``.grad`` of every covered layer by its preconditioned direction.

        In one process (no sharded gradients) the step reads the device once: every decision
        that needs a value (finite gradients, rows and directions; the KL clip's products) and
        every statistic is gathered into one transfer after the solves (:meth:`_read_back`),
        and the writes follow it. CG's iterations read their residuals (a direct solver's
        don't); with ``graft`` and ``kl_clip`` both set the grafted products take a second read.
        Across processes the decisions are agreed by collectives as they arise."""
        with record_function("cgfac.precondition"):
            self._step()

    def _step(self) -> None:
        damping = self.damping(self.steps)
        self._sample_targets = []
        sharded_grads = any(sharded.is_sharded(p.grad) for h in self.layers.values() for p, _ in h.grad_parts()
                            if p.grad is not None)
        if self._reads_once and not self.dist.active and not sharded_grads:
            with deferred_checks():
                self._step_local(damping)
            return
        finite, grads, layouts, reasons = self._agreed_grads()
        if not finite:
            self._skip_step()
            return
        self._owner_routed = set(layouts)
        active: dict[str, tuple[LayerHelper, Tensor]] = {}
        for name, helper in self.layers.items():
            grad = grads[name]
            dtype = self._compute_dtype(helper)
            if name in layouts:  # the owner scheme: ∇W arrives after _collect (which assigns owners)
                grad = torch.empty(0, dtype=dtype, device=helper.device)  # dtype and device only
            elif grad is None:
                helper.chunks = []
                continue
            active[name] = (helper, grad.to(dtype))
            self.stats[name] = {"damping": damping}
            if name in reasons:
                self._note_route(name, f"all-gather: {reasons[name]}")
        self._collect(active)
        exchange = None
        if layouts:
            exchange = sharded.OwnerExchange(
                self.dist, [(name, self.layers[name], self.dist.owner(name), layouts[name]) for name in layouts],
                {name: self._compute_dtype(self.layers[name]) for name in layouts})
            for name, grad in exchange.gather().items():
                helper = active[name][0]
                active[name] = (helper, grad.to(self._compute_dtype(helper)))
            for name in layouts:
                self._note_route(name, f"owner: rank {self.dist.owner(name)} gathers the rows, scatters the direction")
        directions: dict[str, Tensor | None] = {}
        for name, (helper, grad) in active.items():
            if not self._solves_here(name):
                continue
            st = self.stats[name]
            try:
                x = None if "fallback" in st else self._solve(name, helper, grad, damping)
            except torch.linalg.LinAlgError as err:
                x = None
                st["fallback"] = f"solve failed: {err}"
            if x is not None and not torch.isfinite(x).all():
                st["fallback"] = "non-finite direction"
                x = None
            if x is None and "fallback" in st:
                self._fell_back(name, st["fallback"])
            directions[name] = x
        self._share(directions, active)
        if self.graft == "rmsprop":  # every rank its whole-matrix layers, an owner its owner-scheme layers
            self._graft({name: (grad, directions.get(name)) for name, (_, grad) in active.items()
                         if name not in self._owner_routed or self.dist.owns(name)})
        scattered = {} if exchange is None else exchange.scatter(
            {name: (directions[name], self._product(directions[name], active[name][1]))
             for name in layouts if name in directions})
        # Every rank: the layers that take a direction and ⟨X, ∇W⟩ of each, in layer order.
        final: dict[str, float] = {}
        for name in self.layers:
            if name in scattered:
                if scattered[name][0] is not None:
                    final[name] = scattered[name][1]
            elif directions.get(name) is not None:
                final[name] = self._product(directions[name], active[name][1])
        scale = self._kl_scale(list(final.values()))
        for name in final:
            if name in scattered:
                assert exchange is not None
                exchange.write(name, cast(list[Tensor], scattered[name][0]), scale)
            else:
                self.layers[name].set_grad(cast(Tensor, directions[name]).mul_(scale))
        self._check_vanishing(list(final), scale, damping)
        self.steps += 1

    def _step_local(self, damping: float) -> None:
        """:meth:`step` in one process, with one read of the device (see :meth:`step`)."""
        self._owner_routed = set()
        self._pending = {}
        active: dict[str, tuple[LayerHelper, Tensor]] = {}
        for name, helper in self.layers.items():
            if any(p.grad is None for p, _ in helper.grad_parts()):
                helper.chunks = []
                continue
            grad = cast(Tensor, helper.grad_matrix())
            active[name] = (helper, grad.to(self._compute_dtype(helper)))
            self.stats[name] = {"damping": damping}
        self._pending[("", "finite")] = self._grads_finite_tensor()
        with record_function("cgfac.rows"):
            self._collect(active)
        directions: dict[str, Tensor | None] = {}
        for name, (helper, grad) in active.items():
            st = self.stats[name]
            with record_function("cgfac.solve"):
                try:
                    x = None if "fallback" in st else self._solve(name, helper, grad, damping)
                except torch.linalg.LinAlgError as err:
                    x = None
                    st["fallback"] = f"solve failed: {err}"
            if x is not None:
                self._pending[(name, "direction")] = x.sum().isfinite()
                if self.kl_clip is not None and self.graft == "none":
                    self._pending[(name, "product")] = torch.vdot(x.reshape(-1), grad.reshape(-1))
            directions[name] = x
        with record_function("cgfac.read"):
            flags = self._read_back(self._pending)
        self._pending = None
        if not flags.pop(("", "finite")):
            self._collect_undo(list(active))
            self._skip_step()
            return
        for name in active:
            st = self.stats[name]
            if flags.get((name, "rows"), 1.0) == 0.0:
                self._collect_undo([name])
                st["fallback"] = "non-finite curvature rows (batch not kept)"
                directions[name] = None
            elif flags.get((name, "direction"), 1.0) == 0.0:
                st["fallback"] = "non-finite direction"
                directions[name] = None
            if directions[name] is None and "fallback" in st:
                self._fell_back(name, st["fallback"])
        final = [name for name in active if directions[name] is not None]
        if self.graft == "rmsprop":
            self._graft({name: (grad, directions.get(name)) for name, (_, grad) in active.items()})
            if self.kl_clip is not None:  # products of the grafted directions: a second read
                flags = self._read_back({(name, "product"): torch.vdot(cast(Tensor, directions[name]).reshape(-1),
                                                                       active[name][1].reshape(-1))
                                         for name in final})
        scale = self._kl_scale([flags[(name, "product")] for name in final]) if self.kl_clip is not None else 1.0
        with record_function("cgfac.write"):
            for name in final:
                x = cast(Tensor, directions[name])
                self.layers[name].set_grad(x.mul_(scale) if scale != 1.0 else x)
        self._check_vanishing(final, scale, damping)
        self.steps += 1

    def _fell_back(self, name: str, reason: str) -> None:
        """Count and warn: layer ``name`` keeps its plain gradient this step."""
        self.fallbacks += 1
        warnings.warn(f"cgfac: layer {name!r} keeps its plain gradient this step: {reason}", RuntimeWarning,
                      stacklevel=5)

    def _collect_undo(self, names: list[str]) -> None:
        """Forget the rows this step's :meth:`_collect` added to these layers' curvature (a
        skipped step, or rows found non-finite after the fact)."""

    def _read_back(self, pending: Mapping[tuple[str, str], Tensor]) -> dict[tuple[str, str], float]:
        """One device-to-host transfer: the ``pending`` 0-dim tensors (returned by key) and every
        0-dim tensor among this step's statistics (replaced by its float in place)."""
        keys: list[Any] = list(pending)
        tensors = [pending[k] for k in keys]
        for name, state in self.states.items():
            for key, value in (state.stats or {}).items():
                if isinstance(value, Tensor):
                    keys.append((name, key, "stat"))
                    tensors.append(value)
        if not tensors:
            return {}
        device = tensors[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        values = torch.stack([t.detach().reshape(()).to(device=device, dtype=dtype) for t in tensors]).tolist()
        out: dict[tuple[str, str], float] = {}
        for key, value in zip(keys, values):
            if len(key) == 3:
                cast(dict, self.states[key[0]].stats)[key[1]] = value
            else:
                out[key] = value
        return out

    def _grads_finite_tensor(self) -> Tensor:
        """Whether every gradient is finite, as a 0-dim tensor (float32 sums, no host read)."""
        sums = [sharded.local(p.grad).sum(dtype=torch.float32) for p in self.model.parameters() if p.grad is not None]
        if not sums:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum())

    def _product(self, x: Tensor | None, grad: Tensor) -> float:
        """``⟨X, ∇W⟩`` for the KL clip (0 without one, or without a direction)."""
        return 0.0 if self.kl_clip is None or x is None else float((x * grad).sum())

    def _graft(self, blocks: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        """``graft="rmsprop"``: each block's second moment takes this gradient, and its direction
        (where it has one) is rescaled in place to RMSProp's step length (:mod:`cgfac.graft`).
        ``blocks[name] = (∇W, X or None)``: every rank holds the same (all-reduced) gradients and
        directions of whole-matrix layers and computes the same; a layer under the owner scheme
        is grafted on its owner alone (the only holder of its ∇W), before the direction is
        scattered, and its second moment lives there."""
        for name, (grad, x) in blocks.items():
            state = self._state(name)
            if state.graft is None or state.graft.v.shape != grad.shape:
                state.graft = RMSPropGraft.like(grad)
            state.graft.update(grad.to(state.graft.v.dtype), self.graft_beta2)
            if x is not None:
                factor = state.graft.apply(x, grad.to(x.dtype), self.graft_beta2, self.graft_eps)
                self.stats[name]["graft_scale"] = factor  # a 0-dim tensor: layer_stats() reads it

    def _check_vanishing(self, final: list[str], scale: float, damping: float) -> None:
        """Report settings that make the step vanish: the KL clip's ``ν`` below
        ``VANISHING_KL_SCALE``, or ``λ`` above ``DAMPING_SWAMPS`` × a bound on the largest
        curvature eigenvalue (``curvature_bound`` in the layer's stats, e.g. ``tr(A)·tr(G)``).
        Recorded in :meth:`layer_stats` (``"step_vanishes"``) every step; warned once."""
        problems = []
        if self.kl_clip is not None:
            for name in final:
                self.stats[name]["kl_scale"] = scale
            if scale < VANISHING_KL_SCALE:
                note = (f"the KL clip scales the step by nu={scale:.3g} < {VANISHING_KL_SCALE:g}: "
                        f"raise kl_clip (now {self.kl_clip(self.steps):.3g}) or set kl_clip=None")
                for name in final:
                    self.stats[name]["step_vanishes"] = note
                problems.append(note)
        swamped = []
        for name in final:
            bound = self.stats[name].get("curvature_bound")
            lam = self.stats[name].get("damping", damping)
            if bound is not None and lam > DAMPING_SWAMPS * bound:
                note = (f"damping={lam:.3g} > {DAMPING_SWAMPS:g} x the layer's largest curvature eigenvalue "
                        f"(at most {bound:.3g}): the direction is about grad/damping; lower damping")
                st = self.stats[name]
                st["step_vanishes"] = f"{st['step_vanishes']}; {note}" if "step_vanishes" in st else note
                swamped.append(name)
        if swamped:
            problems.append(f"damping={damping:.3g} swamps the curvature of layer(s) "
                            f"{', '.join(repr(n) for n in swamped)} (> {DAMPING_SWAMPS:g} x a bound on their "
                            "largest eigenvalue, tr(A)·tr(G)): the step is about grad/damping; lower damping")
        if problems and not self._warned_vanishing:
            self._warned_vanishing = True
            warnings.warn(
                "cgfac: the step vanishes: " + "; ".join(problems) + ". Units: G is built here from per-sample "
                "gradients (n x the mean loss's output gradients), so kfac-pytorch's damping and kl_clip "
                "correspond to damping·n² and kl_clip·n² here (n: the batch size). Reported once; see "
                "layer_stats()[name]['step_vanishes'].", RuntimeWarning, stacklevel=3)

    def _kl_scale(self, products: list[float]) -> float:
        """``ν = min(1, √(κ / |lr² Σ_layers ⟨X, ∇W⟩|))`` from each layer's ``⟨X, ∇W⟩`` (layer order)."""
        if self.kl_clip is None or not products:
            return 1.0
        lr = self.lr(self.steps)
        vg = sum(products) * lr**2
        if vg == 0 or vg != vg:
            return 1.0
        return min(1.0, (self.kl_clip(self.steps) / abs(vg)) ** 0.5)

    # --- lifetime -----------------------------------------------------------------------------
    def discard_captured(self) -> None:
        """Forget the rows captured since the last step (e.g. of an evaluation-only backward)."""
        for helper in self.layers.values():
            helper.chunks = []
        self._sample_targets = []

    def remove(self) -> None:
        """Remove every hook; the preconditioner captures nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for helper in self.layers.values():
            helper.chunks = []
        self._sample_targets = []

    def __enter__(self) -> Preconditioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def layer_stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics of the last step (method, iterations, residual, damping, ...)."""
        return {k: {key: float(value) if isinstance(value, Tensor) and value.dim() == 0 else value
                    for key, value in v.items()} for k, v in self.stats.items()}

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes the next step; tensors are referenced, as in ``torch.optim``.

        Only tensors and plain Python values: it loads with ``torch.load(weights_only=True)``.
        Across processes this is *this rank's* state (a layer's curvature lives on its owner):
        it resumes on the same number of processes. :func:`cgfac.checkpoint.full_state_dict`
        assembles the state of every rank into one that loads on any number of processes."""
        return {
            "type": type(self).__name__,
            "world_size": self.dist.world,
            "rank": self.dist.rank,
            "full": not self.dist.active,
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "skipped_steps": self.skipped_steps,
            "hyperparameters": {k: v.value for k, v in vars(self).items()
                                if isinstance(v, HyperParam) and not callable(v.value)},
            "generator": self._generator.get_state(),
            "generators": {d: g.get_state() for d, g in self._generators.items()},
            "layers": {name: self.states[name].state_dict() for name in self.layers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` or a :func:`cgfac.checkpoint.full_state_dict`.

        A full state (or one saved by a single process) loads on any number of processes: every
        rank takes every layer's state and, once owners are assigned at the next step, keeps
        only its own layers'. One rank's own state from ``N > 1`` processes loads only on ``N``
        processes, into the same rank. A state of another class or model raises ``ValueError``.
        Random streams of the true Fisher: each rank continues its own where the saved state
        has one for it (same number of processes); otherwise it starts a fresh stream from the
        saved seed generator (:meth:`sampling_generator`)."""
        if not isinstance(state, dict) or "layers" not in state:
            raise ValueError("state_dict: not a cgfac preconditioner state")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state_dict: saved from {state.get('type')}, loading into {type(self).__name__}")
        saved_world = state.get("world_size", 1)
        if not state.get("full", True) and (saved_world != self.dist.world or state.get("rank") != self.dist.rank):
            raise ValueError(
                f"state_dict: rank {state.get('rank')}'s own state of {saved_world} processes cannot be loaded on rank "
                f"{self.dist.rank} of {self.dist.world} (its layers' curvature lives on their owners); save "
                "cgfac.checkpoint.full_state_dict(pre) instead, which loads on any number of processes")
        mine = {name: (h.d_out, h.d_in) for name, h in self.layers.items()}
        theirs = {name: tuple(layer["shape"]) for name, layer in state["layers"].items()}
        if mine != theirs:
            diff = sorted(f"{n}: saved {theirs.get(n)}, model {mine.get(n)}"
                          for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
            raise ValueError("state_dict: saved for a different model: " + "; ".join(diff))
        for key, value in state["hyperparameters"].items():
            param = getattr(self, key)
            if not callable(param.value):
                param.value = value
                param(self.steps)  # re-checks bounds
        self.steps = state["steps"]
        self.fallbacks = state["fallbacks"]
        self.skipped_steps = state["skipped_steps"]
        self._generator.set_state(state["generator"])
        self._generators = {}
        generators = state["generators"]
        per_rank = state.get("rank_generators")
        if per_rank is not None:
            generators = per_rank[self.dist.rank] if len(per_rank) == self.dist.world else {}
        elif saved_world != self.dist.world:
            generators = {}
        for device, gen_state in generators.items():
            gen = torch.Generator(device=device)
            gen.set_state(gen_state)
            self._generators[device] = gen
        for name in self.layers:
            self.states[name].load_state_dict(state["layers"][name])
