"""K-FAC and CG-FAC as ``torch.optim`` optimizers that own the update (Martens & Grosse 2015, §6–7).

The preconditioner (:class:`cgfac.KFAC` or :class:`cgfac.CGFAC`) turns the gradient ``∇h`` into the
damped natural-gradient direction ``Δ = −(C̃ + λI)⁻¹ ∇h`` (``C̃``: the Kronecker or per-layer
curvature, ``λ``: the damping). The optimizer then takes the update ::

    δ = lr · α · Δ + μ · δ₀                               (δ₀: the previous update)

where ``(α, μ)`` minimise the quadratic model of the loss on this batch ::

    M(δ) = ∇hᵀδ + ½ δᵀ (C + λI) δ                        (C: the exact GGN, = Fisher for these losses)
    [α, μ]ᵀ = −[[ΔᵀC̄Δ, ΔᵀC̄δ₀], [δ₀ᵀC̄Δ, δ₀ᵀC̄δ₀]]⁻¹ [∇hᵀΔ, ∇hᵀδ₀]ᵀ,   C̄ = C + (λ + wd)I

(``adaptive="lr+momentum"``; ``"lr"`` solves for ``α`` alone with ``μ`` = the group's
``momentum``; ``"none"`` takes ``α = 1``, i.e. SGD with momentum on the preconditioned direction).
The products ``Cv`` are exact: one forward-mode pass (``torch.autograd.forward_ad``) through the
model per vector gives ``Jv`` at the inputs recorded from the closure's forward, and the output
Hessian of the likelihood (``loss_type``) closes the form ``vᵀCw = (1/r) Σ_rows (Jv)ᵀ H (Jw)``:

* ``"cross_entropy"``: logits, ``H = diag(p) − ppᵀ``, ``p = softmax(z)`` (loss: mean over rows);
* ``"bernoulli"``: logits, ``H = diag(p(1 − p))``, ``p = σ(z)`` (loss: summed over the last
  dimension, mean over rows);
* ``"gaussian"``/``"mse"``: ``H = I`` (loss: ``½‖y − z‖²`` summed over the last dimension, mean over rows).

The loss the closure returns must follow that convention (these are also the conventions of
:func:`cgfac.losses.sampled_loss`).

Every ``damping_interval`` (``T``) steps the Levenberg–Marquardt rule (§6.5) adapts ``λ`` from the
reduction ratio on the same batch ::

    ρ = (h(θ + δ) − h(θ)) / (M(δ) − M(0)),  M without λ (kfac-jax's default)
    λ ← λ / ω if ρ < 1/4,   λ ← λ · ω if ρ > 3/4,   ω = damping_decay^T,  λ ∈ [min_damping, max_damping]

A non-finite ``ρ`` counts as a failure. ``h(θ + δ)`` needs the loss at the new point: the closure is
called once more (with curvature capture paused; its gradients are discarded and the model's
buffers, e.g. BatchNorm running statistics, restored), so adaptive damping requires
``step(closure)``. A non-finite loss at the new point undoes the update.

Units: ``λ`` is in the units of the Fisher of the *mean* loss with per-sample gradients (as
kfac-jax's). kfac-pytorch builds ``G`` from the mean loss's output gradients, ``1/n²`` of this
library's, so its ``damping`` corresponds to ``damping · n²`` here (``n``: the batch size).
"""

from cgfac.optim.base import SecondOrderOptimizer
from cgfac.optim.optimizers import CGFAC, KFAC, WIDE_DEFAULTS
from cgfac.optim.quadratic import output_quad_form
from cgfac.optim.transformer_kfac import TransformerKFAC, hidden_matrices

__all__ = ["CGFAC", "KFAC", "WIDE_DEFAULTS", "SecondOrderOptimizer", "TransformerKFAC", "hidden_matrices",
           "output_quad_form"]
