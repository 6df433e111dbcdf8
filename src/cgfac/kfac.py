"""Standard K-FAC: running Kronecker factors, eigendecomposed every few steps.

Every ``factor_update_steps`` steps the factors of each layer are refreshed from this batch's
rows (``cgfac.kron`` scaling) as running averages ``A ← ρ A + (1 − ρ) A_batch`` (likewise
``G``; ``ρ = factor_decay``, the first batch initialises them). Every ``inv_update_steps`` steps
they are eigendecomposed, and every step the direction is ::

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
preconditioned gradient every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cgfac.base import Preconditioner
from cgfac.hyperparams import Hyper, HyperParam, choice, positive_int
from cgfac.kron import DAMPING_FORMS, KronEigen
from cgfac.layers import LayerHelper


class KFAC(Preconditioner):
    """K-FAC with eigendecomposed factors (see the module docstring).

    Args (beyond :class:`cgfac.base.Preconditioner`'s):
        factor_decay: ρ, the weight of the past in the running factors (0: this batch only).
        factor_update_steps: refresh the factors every this-many steps.
        inv_update_steps: recompute the eigendecompositions every this-many steps.
        strategy: "comm-opt" or "mem-opt", the KAISA trade-off (only matters across processes).
        damping_form: "exact" (``G X A + λX = ∇W``) or "factored" (Tikhonov split by ``π``).
        factor_warmup: "first" (the first batch initialises the factors) or "mean" (decay
            ``min(ρ, 1 − 1/(t + 1))`` at the ``t``-th factor update).
        curvature_samples: build each batch's factors from only the first this-many samples of
            the batch (None: all). The factors cost ``n (d_in² + d_out²)`` per layer, as much as
            the backward pass of a wide layer at ``n ≈ d``; a running average over many batches
            needs far fewer samples per batch than the gradient does.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_decay: Hyper = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        strategy: str = "comm-opt",
        damping_form: str = "exact",
        factor_warmup: str = "first",
        curvature_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.damping_form = choice("damping_form", damping_form, DAMPING_FORMS)
        self.factor_warmup = choice("factor_warmup", factor_warmup, ("first", "mean"))
        self.factor_decay = HyperParam("factor_decay", factor_decay, low=0.0, high=1.0)
        self.factor_update_steps = positive_int("factor_update_steps", factor_update_steps)
        self.inv_update_steps = positive_int("inv_update_steps", inv_update_steps)
        self.strategy = choice("strategy", strategy, ("comm-opt", "mem-opt"))
        self.curvature_samples = positive_int("curvature_samples", curvature_samples, allow_none=True)
        self.steps = 0
        super().__init__(model, **kwargs)
        self.factors: dict[str, tuple[Tensor, ...]] = {}  # (A, G); per-layer-type for other blocks
        self.eigen: dict[str, Any] = {}  # KronEigen, or the layer type's decomposition
        self.eigen_age: dict[str, int] = {}
        self.factor_updates: dict[str, int] = {}  # batches folded into each layer's factors

    def _wants_rows(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def _owner_only(self, name: str) -> bool:
        return self.strategy == "mem-opt"

    def _holds_decomposition(self, name: str) -> bool:
        return self.strategy == "comm-opt" or self.dist.owns(name)

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        if self.dist.active and not self.dist.owners:
            self.dist.assign({n: h.decomposition_cost() for n, h in self.layers.items()})
            for name in self.layers:  # a full state loaded on every rank: keep only what this rank uses
                if not self._holds_decomposition(name):
                    self.eigen.pop(name, None)
                    self.eigen_age.pop(name, None)
        if self._wants_rows():
            self._update_factors(active)  # takes (and so clears) every active layer's rows
        for name in active:
            if name not in self.factors:
                self.stats[name].setdefault("fallback", self._no_rows_reason())
        self._refresh_decompositions([n for n in active if n in self.factors])

    def _batch_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> dict[str, tuple[Tensor, ...]]:
        """This batch's factors per layer, averaged over ranks weighted by their samples."""
        local = {}
        for name, (helper, _) in active.items():
            rows = self._rows(helper, self.curvature_samples)
            if rows is not None:
                local[name] = (helper.kfac_factors(rows), rows.n)
        if not self.dist.active:
            return {name: fs for name, (fs, _) in local.items()}
        buffers = {}
        for name, (helper, grad) in active.items():
            fs, n = local.get(name, (helper.kfac_zero_factors(grad), 0))
            buffers[name] = [*(f * n for f in fs), grad.new_full((1,), float(n))]
        self.dist.all_reduce_sum([t for bufs in buffers.values() for t in bufs])
        return {name: tuple(f / bufs[-1] for f in bufs[:-1]) for name, bufs in buffers.items() if bufs[-1] > 0}

    def _update_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Fold this batch's factors into the running factors; non-finite ones are skipped."""
        rho = self.factor_decay(self.steps)
        for name, new in self._batch_factors(active).items():
            if not all(f.isfinite().all() for f in new):
                problem = "non-finite curvature rows (factor update skipped)"
                if name in self.factors:
                    self.stats[name]["factor_update"] = problem
                else:
                    self.stats[name]["fallback"] = problem
                continue
            t = self.factor_updates.get(name, 0)
            decay = min(rho, 1 - 1 / (t + 1)) if self.factor_warmup == "mean" else rho
            if name not in self.factors:
                self.factors[name] = new
            else:
                self.factors[name] = tuple(old.mul_(decay).add_(f, alpha=1 - decay)
                                           for old, f in zip(self.factors[name], new))
            self.factor_updates[name] = t + 1

    def _refresh_decompositions(self, names: list[str]) -> None:
        """Eigendecompose due layers on their owners; comm-opt broadcasts the results."""
        due = [n for n in names if self._holds_decomposition(n)
               and (n not in self.eigen or self.steps % self.inv_update_steps == 0)]
        fresh: dict[str, Any] = {}
        for name in due:
            if not self.dist.owns(name):
                continue
            try:
                fresh[name] = self.layers[name].kfac_decompose(self.factors[name])
            except torch.linalg.LinAlgError as err:
                fresh[name] = None
                self.stats[name]["decomposition_error"] = str(err)
        if self.dist.active and self.strategy == "comm-opt":
            self._broadcast_decompositions(due, fresh)
        for name in due:
            e = fresh.get(name)
            if e is not None:
                self.eigen[name], self.eigen_age[name] = e, 0
            elif name in self.eigen:
                error = self.stats[name].get("decomposition_error", "failed on its owner")
                self.stats[name]["decomposition_error"] = error + " (previous decomposition kept)"
                self.eigen_age[name] += 1
            else:
                self.stats[name]["fallback"] = "solve failed: " + self.stats[name].get(
                    "decomposition_error", "eigendecomposition failed on its owner")
        for name in names:
            if name in self.eigen and name not in due:
                self.eigen_age[name] += 1

    def _broadcast_decompositions(self, due: list[str], fresh: dict[str, Any]) -> None:
        items = []
        buffers = {}
        for name in due:
            helper, factors = self.layers[name], self.factors[name]
            e = fresh.get(name)
            flag = factors[0].new_ones(1) if e is not None else factors[0].new_zeros(1)
            tensors = list(e.tensors()) if e is not None else helper.kfac_empty_decomposition(factors)
            buffers[name] = (tensors, flag)
            items.append((self.dist.owner(name), [*tensors, flag]))
        self.dist.broadcast_from_owners(items)
        for name, (tensors, flag) in buffers.items():
            fresh[name] = self.layers[name].kfac_decomposition(tensors) if flag.item() == 1 else None

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        method = getattr(self.eigen[name], "method", "eigen")  # normalisation layers: "feature-blocks"
        self.stats[name].update(method=method, decomposition_age=self.eigen_age[name])
        eigen = self.eigen[name]
        damping = self._layer_damping(name, damping, eigen)
        if isinstance(eigen, KronEigen):  # tr(A)·tr(G) ≥ the largest eigenvalue of A ⊗ G
            self.stats[name]["curvature_bound"] = float(eigen.s_a.sum()) * float(eigen.s_g.sum())
        if self.damping_form == "factored" and isinstance(eigen, KronEigen):
            self.stats[name]["damping_form"] = "factored"
            return eigen.solve(grad, damping, form="factored")
        return eigen.solve(grad, damping)

    def _layer_state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if name in self.factors:
            state["factors"] = self.factors[name]
        if name in self.eigen:
            e = self.eigen[name]
            state["eigen"] = tuple(e.tensors())
            state["eigen_age"] = self.eigen_age[name]
        if self.factor_warmup == "mean" and name in self.factor_updates:
            state["factor_updates"] = self.factor_updates[name]
        return state

    def _load_layer_state(self, name: str, state: dict[str, Any], device: torch.device) -> None:
        self.factors.pop(name, None)
        self.eigen.pop(name, None)
        self.factor_updates.pop(name, None)
        if "factor_updates" in state:
            self.factor_updates[name] = state["factor_updates"]
        elif "factors" in state:  # saved with factor_warmup="first": at least one batch folded in
            self.factor_updates[name] = 1
        if "factors" in state:
            self.factors[name] = tuple(t.to(device).clone() for t in state["factors"])
        if "eigen" in state:
            self.eigen[name] = self.layers[name].kfac_decomposition([t.to(device).clone() for t in state["eigen"]])
            self.eigen_age[name] = state["eigen_age"]
