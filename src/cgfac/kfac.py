"""Standard K-FAC: running Kronecker factors, eigendecomposed every few steps.

Every ``factor_update_steps`` steps the factors of each layer are refreshed from this batch's
rows (``cgfac.kron`` scaling) as running averages ``A ← ρ A + (1 − ρ) A_batch`` (likewise
``G``; ``ρ = factor_decay``, the first batch initialises them). Every ``inv_update_steps`` steps
they are eigendecomposed, and every step the direction is ::

    X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ

which solves ``G X A + λX = ∇W`` exactly for the current factors (damping added exactly to the
Kronecker product, not split between the factors).

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
from cgfac.kron import KronEigen, KronRows
from cgfac.layers import LayerHelper


class KFAC(Preconditioner):
    """K-FAC with eigendecomposed factors (see the module docstring).

    Args (beyond :class:`cgfac.base.Preconditioner`'s):
        factor_decay: ρ, the weight of the past in the running factors (0: this batch only).
        factor_update_steps: refresh the factors every this-many steps.
        inv_update_steps: recompute the eigendecompositions every this-many steps.
        strategy: "comm-opt" or "mem-opt", the KAISA trade-off (only matters across processes).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_decay: Hyper = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        strategy: str = "comm-opt",
        **kwargs: Any,
    ) -> None:
        self.factor_decay = HyperParam("factor_decay", factor_decay, low=0.0, high=1.0)
        self.factor_update_steps = positive_int("factor_update_steps", factor_update_steps)
        self.inv_update_steps = positive_int("inv_update_steps", inv_update_steps)
        self.strategy = choice("strategy", strategy, ("comm-opt", "mem-opt"))
        self.steps = 0
        super().__init__(model, **kwargs)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.eigen: dict[str, KronEigen] = {}
        self.eigen_age: dict[str, int] = {}

    def _wants_rows(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def _owner_only(self, name: str) -> bool:
        return self.strategy == "mem-opt"

    def _holds_decomposition(self, name: str) -> bool:
        return self.strategy == "comm-opt" or self.dist.owns(name)

    def _collect(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        if self.dist.active and not self.dist.owners:
            self.dist.assign({n: h.d_in**3 + h.d_out**3 for n, h in self.layers.items()})
        if self._wants_rows():
            self._update_factors(active)  # takes (and so clears) every active layer's rows
        for name in active:
            if name not in self.factors:
                self.stats[name].setdefault("fallback", self._no_rows_reason())
        self._refresh_decompositions([n for n in active if n in self.factors])

    def _batch_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """This batch's factors per layer, averaged over ranks weighted by their samples."""
        local = {}
        for name, (helper, _) in active.items():
            rows = self._rows(helper)
            if rows is not None:
                local[name] = (*KronRows.from_rows([rows], [1.0]).factors(), rows.n)
        if not self.dist.active:
            return {name: (a, g) for name, (a, g, _) in local.items()}
        buffers = {}
        for name, (helper, grad) in active.items():
            a, g, n = local.get(name, (grad.new_zeros(helper.d_in, helper.d_in),
                                       grad.new_zeros(helper.d_out, helper.d_out), 0))
            buffers[name] = [a * n, g * n, grad.new_full((1,), float(n))]
        self.dist.all_reduce_sum([t for bufs in buffers.values() for t in bufs])
        return {name: (a / n, g / n) for name, (a, g, n) in buffers.items() if n > 0}

    def _update_factors(self, active: dict[str, tuple[LayerHelper, Tensor]]) -> None:
        """Fold this batch's factors into the running factors; non-finite ones are skipped."""
        rho = self.factor_decay(self.steps)
        for name, (a_new, g_new) in self._batch_factors(active).items():
            if not (a_new.isfinite().all() and g_new.isfinite().all()):
                problem = "non-finite curvature rows (factor update skipped)"
                if name in self.factors:
                    self.stats[name]["factor_update"] = problem
                else:
                    self.stats[name]["fallback"] = problem
                continue
            if name not in self.factors:
                self.factors[name] = (a_new, g_new)
            else:
                a_old, g_old = self.factors[name]
                self.factors[name] = (a_old.mul_(rho).add_(a_new, alpha=1 - rho),
                                      g_old.mul_(rho).add_(g_new, alpha=1 - rho))

    def _refresh_decompositions(self, names: list[str]) -> None:
        """Eigendecompose due layers on their owners; comm-opt broadcasts the results."""
        due = [n for n in names if self._holds_decomposition(n)
               and (n not in self.eigen or self.steps % self.inv_update_steps == 0)]
        fresh: dict[str, KronEigen | None] = {}
        for name in due:
            if not self.dist.owns(name):
                continue
            try:
                fresh[name] = KronEigen.from_factors(*self.factors[name])
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

    def _broadcast_decompositions(self, due: list[str], fresh: dict[str, KronEigen | None]) -> None:
        items = []
        buffers = {}
        for name in due:
            a, g = self.factors[name]
            e = fresh.get(name)
            flag = a.new_ones(1) if e is not None else a.new_zeros(1)
            if e is None:
                e = KronEigen(a.new_zeros(a.shape[0]), torch.zeros_like(a),
                              g.new_zeros(g.shape[0]), torch.zeros_like(g))
            buffers[name] = (e, flag)
            items.append((self.dist.owner(name), [e.s_a, e.q_a, e.s_g, e.q_g, flag]))
        self.dist.broadcast_from_owners(items)
        for name, (e, flag) in buffers.items():
            fresh[name] = e if flag.item() == 1 else None

    def _solve(self, name: str, helper: LayerHelper, grad: Tensor, damping: float) -> Tensor | None:
        self.stats[name].update(method="eigen", decomposition_age=self.eigen_age[name])
        return self.eigen[name].solve(grad, damping)

    def _layer_state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if name in self.factors:
            state["factors"] = self.factors[name]
        if name in self.eigen:
            e = self.eigen[name]
            state["eigen"] = (e.s_a, e.q_a, e.s_g, e.q_g)
            state["eigen_age"] = self.eigen_age[name]
        return state

    def _load_layer_state(self, name: str, state: dict[str, Any], device: torch.device) -> None:
        self.factors.pop(name, None)
        self.eigen.pop(name, None)
        if "factors" in state:
            self.factors[name] = tuple(t.to(device).clone() for t in state["factors"])
        if "eigen" in state:
            self.eigen[name] = KronEigen(*(t.to(device).clone() for t in state["eigen"]))
            self.eigen_age[name] = state["eigen_age"]
