"""Standard K-FAC: running Kronecker factors, eigendecomposed every few steps.

Every ``factor_update_steps`` steps the factors of each layer are refreshed from this batch's
rows (``cgfac.curvature.kron`` scaling) as running averages ``A ← ρ A + (1 − ρ) A_batch`` (likewise
``G``; ``ρ = factor_decay``, the first batch initialises them). Every ``inv_update_steps`` steps
they are eigendecomposed (the eigen solver with a refresh period,
:class:`cgfac.solvers.PeriodicEigenSolver`; each block type's factors and decomposition are its
:class:`cgfac.solvers.FactorKind`), and every step the direction is ::

    X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ

which solves ``G X A + λX = ∇W`` exactly for the current factors (damping added exactly to the
Kronecker product, not split between the factors; ``damping_form="exact"``). With
``damping_form="factored"`` (Martens & Grosse 2015, §6.3) it solves
``(G + γ_G I) X (A + γ_A I) = ∇W``, ``γ_A = π√λ``, ``γ_G = √λ/π``,
``π = √((tr(A)/d_in) / (tr(G)/d_out))``:
``X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ ((s_G + γ_G)(s_A + γ_A)ᵀ)] Q_Aᵀ``. Layers whose blocks are not
Kronecker products (embeddings' diagonal input factor, normalisation layers' feature blocks)
keep their own exact damping.

``factor_warmup`` sets how the running factors start: ``"first"`` (the first batch initialises
them), or ``"mean"`` (kfac-jax): the ``t``-th update (``t = 0, 1, ...``) uses the decay
``min(ρ, 1 − 1/(t + 1))``, so the early factors are the plain mean of the batches seen.

Across processes (KAISA, Pauloski et al. 2021): batch factors are averaged over ranks by a
bucketed asynchronous all-reduce (weighted by each rank's samples); each layer's
eigendecomposition is computed by one owner rank (greedy assignment by ``d_in³ + d_out³``).
``strategy="comm-opt"`` broadcasts the decompositions, after which every rank preconditions
every layer itself; ``"mem-opt"`` keeps each decomposition on its owner, which broadcasts the
preconditioned gradient every step. Layers whose FSDP2-sharded gradients go by the owner scheme
(:mod:`cgfac.distributed.sharded`) are solved on their owner under either strategy (only it holds the whole
``∇W``): their decompositions stay there and each rank receives only its rows of the direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from cgfac.config import DampingForm, FactorWarmup, Hyper, HyperParam, Strategy, check, positive_int
from cgfac.curvature import KronEigen, RunningFactors
from cgfac.layers import LayerHelper
from cgfac.precondition.base import Preconditioner
from cgfac.precondition.memory import Block, BlockMemory, plan_kfac, resolve_forms
from cgfac.precondition.state import LayerState, StateView
from cgfac.solvers import Decomposition, FactorKind, KronFactorKind, PeriodicEigenSolver, factor_kind


def kfac_kind(helper: LayerHelper) -> FactorKind:
    """How K-FAC forms and decomposes the factors of ``helper``'s block (its structure, shape and
    ``kfac_form``)."""
    return factor_kind(helper.structure, helper.d_in, helper.d_out, helper.kfac_form)


def rebuild_decomposition(helper: LayerHelper, tensors: Sequence[Tensor]) -> Decomposition:
    """A saved decomposition of ``helper``'s block from its tensors (its kind as the block is now)."""
    return kfac_kind(helper).rebuild(tensors)


class KFAC(Preconditioner):
    """K-FAC with eigendecomposed factors (see the module docstring).

    Args (beyond :class:`cgfac.precondition.base.Preconditioner`'s):
        factor_decay: ρ, the weight of the past in the running factors (0: this batch only).
        factor_update_steps: refresh the factors every this-many steps.
        inv_update_steps: recompute the eigendecompositions every this-many steps.
        strategy: "comm-opt" or "mem-opt", the KAISA trade-off (only matters across processes).
        damping_form: "exact" (``G X A + λX = ∇W``) or "factored" (Tikhonov split by ``π``).
        factor_warmup: "first" (the first batch initialises the factors) or "mean" (decay
            ``min(ρ, 1 − 1/(t + 1))`` at the ``t``-th factor update).
        curvature_samples: build each batch's factors from only the first this-many entries of
            the batch (dim 0 of the inputs: a sequence with all its positions; None: all). The
            layers' rows are built for those entries only (a convolution's patches are costly),
            while the gradient's per-sample scaling counts the whole batch. The factors cost
            ``n (d_in² + d_out²)`` per layer, as much as the backward pass of a wide layer at
            ``n ≈ d``; a running average over many batches needs far fewer samples per batch than
            the gradient does.
        factor_form: each Kronecker block's form: "auto" (default: dense, unless the blocks'
            state exceeds ``memory_budget``; then, largest saving first, blocks keep their larger
            side as a diagonal factor, :mod:`cgfac.precondition.memory`), "dense", "diag-out", "diag-in" or "diag"
            (both sides diagonal), or ``{block name or regex: form}`` (others "auto"). A block
            forced "dense" that does not fit the budget raises ``ValueError`` naming it and its
            bytes. ``memory_plan[name]`` and the registration report give each block's form, rule
            and bytes.

    Per block, :attr:`states` holds a :class:`cgfac.precondition.state.LayerState`: the running factors
    (:class:`cgfac.curvature.RunningFactors`), the kept decomposition and its age (the solver
    state) and the last statistics. ``factors``, ``eigen``, ``eigen_age`` and ``factor_updates``
    are dict-like views of them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_decay: Hyper = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        strategy: Strategy = "comm-opt",
        damping_form: DampingForm = "exact",
        factor_warmup: FactorWarmup = "first",
        curvature_samples: int | None = None,
        factor_form: str | Mapping[str, str] = "auto",
        **kwargs: Any,
    ) -> None:
        if not isinstance(factor_form, (str, Mapping)):
            raise TypeError(f"factor_form must be a str or a mapping, got {type(factor_form).__name__}")
        self.factor_form = factor_form
        self.damping_form: DampingForm = check("damping_form", damping_form, DampingForm)
        self.factor_warmup: FactorWarmup = check("factor_warmup", factor_warmup, FactorWarmup)
        self.factor_decay = HyperParam("factor_decay", factor_decay, low=0.0, high=1.0)
        self.factor_update_steps = positive_int("factor_update_steps", factor_update_steps)
        self.eigen_solver = PeriodicEigenSolver(positive_int("inv_update_steps", inv_update_steps))
        self.strategy: Strategy = check("strategy", strategy, Strategy)
        self.curvature_samples = positive_int("curvature_samples", curvature_samples, allow_none=True)
        self.steps = 0
        super().__init__(model, **kwargs)

    @property
    def inv_update_steps(self) -> int:
        """The refresh period of the eigendecompositions (:attr:`eigen_solver`'s)."""
        return self.eigen_solver.period

    @inv_update_steps.setter
    def inv_update_steps(self, steps: int) -> None:
        self.eigen_solver.period = positive_int("inv_update_steps", steps)

    def _plan_memory(self, blocks: dict[str, Block]) -> dict[str, BlockMemory]:
        """Each block's form by the rule of :mod:`cgfac.precondition.memory` (set on its helper), with its bytes.
        Kronecker blocks whose registered factor kind is not the dense one keep their factors (sized
        dense, no cheaper form)."""
        for name, block in blocks.items():
            if block.structure == "kron" and not isinstance(kfac_kind(self.layers[name]), KronFactorKind):
                blocks[name] = replace(block, structure="kron (own factors)")
        requested = resolve_forms(list(blocks), self.factor_form)
        plan = plan_kfac(blocks, self.memory_budget, requested, graft=self.graft != "none")
        for name, memory in plan.items():
            if blocks[name].structure == "kron":
                self.layers[name].kfac_form = memory.form
        return plan

    def _new_state(self, helper: LayerHelper) -> LayerState:
        return LayerState(helper, RunningFactors(self.factor_warmup), rebuild=partial(rebuild_decomposition, helper))

    def _running(self, name: str) -> RunningFactors:
        running = self.states[name].curvature
        assert isinstance(running, RunningFactors)
        return running

    def _factors(self, name: str) -> tuple[Tensor, ...]:
        tensors = self._running(name).tensors
        assert tensors is not None
        return tensors

    @property
    def factors(self) -> StateView:
        """Each layer's running factors ``(A, G)`` (per layer type for other blocks)."""
        return StateView(lambda: self.states,
                         lambda s: s.curvature.tensors if isinstance(s.curvature, RunningFactors) else None)

    @property
    def factor_updates(self) -> StateView:
        """Batches folded into each layer's factors."""
        return StateView(lambda: self.states,
                         lambda s: s.curvature.updates if isinstance(s.curvature, RunningFactors) and s.curvature
                         else None)

    @property
    def eigen(self) -> StateView:
        """Each layer's kept decomposition (:class:`KronEigen`, or the layer type's)."""
        return StateView(lambda: self.states, lambda s: s.solver.decomposition)

    @property
    def eigen_age(self) -> StateView:
        """Steps since each layer's decomposition was computed."""
        return StateView(lambda: self.states,
                         lambda s: s.solver.decomposition_age if s.solver.decomposition is not None else None)

    def _wants_rows(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def owner_only(self, name: str) -> bool:
        return self.strategy == "mem-opt"

    def _holds_decomposition(self, name: str) -> bool:
        """Whether this rank keeps the layer's decomposition: its owner; under comm-opt every rank,
        except for layers under the owner scheme of sharded gradients (only the owner solves)."""
        return (self.strategy == "comm-opt" and name not in self.route.owner_routed) or self.dist.owns(name)

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        if self.dist.active and not self.dist.owners:
            self.dist.assign({n: kfac_kind(h).cost() for n, h in self.layers.items()})
            for name in self.layers:  # a full state loaded on every rank: keep only what this rank uses
                if not self._holds_decomposition(name):
                    self.states[name].solver.decomposition = None
        if self._wants_rows():
            self._update_factors(active)  # takes (and so clears) every active layer's rows
        for name in active:
            if not self._running(name):
                self.stats[name].setdefault("fallback", self.capture.no_rows_reason())
        self._refresh_decompositions([n for n in active if self._running(name=n)])

    def _batch_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> dict[str, tuple[Tensor, ...]]:
        """This batch's factors per layer, averaged over ranks weighted by their samples."""
        local = {}
        for name, (helper, _) in active.items():
            rows = self._rows(helper, self.curvature_samples)
            if rows is not None:
                local[name] = (kfac_kind(helper).batch_factors(rows), rows.n)
        if not self.dist.active:
            return {name: fs for name, (fs, _) in local.items()}
        buffers = {}
        for name, (helper, grad) in active.items():
            fs, n = local.get(name, (kfac_kind(helper).zero_factors(grad), 0))
            buffers[name] = [*(f * n for f in fs), grad.new_full((1,), float(n))]
        self.dist.all_reduce_sum([t for bufs in buffers.values() for t in bufs])
        return {name: tuple(f / bufs[-1] for f in bufs[:-1]) for name, bufs in buffers.items() if bufs[-1] > 0}

    def _update_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Fold this batch's factors into the running factors; non-finite ones are skipped."""
        rho = self.factor_decay(self.steps)
        for name, new in self._batch_factors(active).items():
            running = self._running(name)
            if not all(f.isfinite().all() for f in new):
                problem = "non-finite curvature rows (factor update skipped)"
                self.stats[name]["factor_update" if running else "fallback"] = problem
                continue
            running.update(new, rho)

    def _refresh_decompositions(self, names: list[str]) -> None:
        """Eigendecompose due layers on their owners (:attr:`eigen_solver`); comm-opt broadcasts the results."""
        solver = self.eigen_solver
        due = [n for n in names if self._holds_decomposition(n) and solver.due(self.states[n].solver, self.steps)]
        fresh: dict[str, Any] = {}
        for name in due:
            if not self.dist.owns(name):
                continue
            try:
                fresh[name] = solver.refresh(kfac_kind(self.layers[name]), self._factors(name))
            except torch.linalg.LinAlgError as err:
                fresh[name] = None
                self.stats[name]["decomposition_error"] = str(err)
        if self.dist.active and self.strategy == "comm-opt":  # not the owner scheme's: only their owner holds them
            self._broadcast_decompositions([n for n in due if n not in self.route.owner_routed], fresh)
        for name in due:
            e, state = fresh.get(name), self.states[name].solver
            if e is not None:
                solver.keep(state, e)
            elif state.decomposition is not None:
                error = self.stats[name].get("decomposition_error", "failed on its owner")
                self.stats[name]["decomposition_error"] = error + " (previous decomposition kept)"
                solver.age(state)
            else:
                self.stats[name]["fallback"] = "solve failed: " + self.stats[name].get(
                    "decomposition_error", "eigendecomposition failed on its owner")
        for name in names:
            state = self.states[name].solver
            if state.decomposition is not None and name not in due:
                solver.age(state)

    def _broadcast_decompositions(self, due: list[str], fresh: dict[str, Any]) -> None:
        items = []
        buffers = {}
        for name in due:
            kind, factors = kfac_kind(self.layers[name]), self._factors(name)
            e = fresh.get(name)
            flag = factors[0].new_ones(1) if e is not None else factors[0].new_zeros(1)
            tensors = list(e.tensors()) if e is not None else kind.empty_tensors(factors)
            buffers[name] = (tensors, flag)
            items.append((self.dist.owner(name), [*tensors, flag]))
        self.dist.broadcast_from_owners(items)
        for name, (tensors, flag) in buffers.items():
            fresh[name] = kfac_kind(self.layers[name]).rebuild(tensors) if flag.item() == 1 else None

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        solver = self.states[name].solver
        eigen = solver.decomposition
        if eigen is None:  # _refresh_decompositions keeps one for every layer this rank solves
            raise RuntimeError(f"K-FAC: layer {name!r} has no decomposition to solve with")
        method = getattr(eigen, "method", "eigen")  # normalisation layers: "feature-blocks"
        self.stats[name].update(method=method, decomposition_age=solver.decomposition_age)
        damping = self._layer_damping(name, damping, eigen)
        if isinstance(eigen, KronEigen):  # tr(A)·tr(G) ≥ the largest eigenvalue of A ⊗ G
            self.stats[name]["curvature_bound"] = float(eigen.s_a.sum()) * float(eigen.s_g.sum())
        if self.damping_form == "factored" and isinstance(eigen, KronEigen):
            self.stats[name]["damping_form"] = "factored"
            return self.eigen_solver.solve(solver, grad, damping, form="factored")
        return self.eigen_solver.solve(solver, grad, damping)
