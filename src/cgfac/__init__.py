"""cgfac: CG-FAC (matrix-free K-FAC by conjugate gradients) and standard K-FAC for PyTorch.

Use a preconditioner between the backward and the optimizer (``loss.backward(); pre.step();
opt.step()``), or an optimizer of :mod:`cgfac.optim` that owns the update (``opt.step(closure)``).

Public names (``__all__``), one line each:

=========================  ==========================================================================
``CGFAC``                  preconditioner: K-FAC's (or the exact Fisher block's) system solved matrix-free
``KFAC``                   preconditioner: standard K-FAC, running factors eigendecomposed every few steps
``Preconditioner``         the base of both: hooks, the step's data flow, reports, checkpoints
``ReportEntry``            one trainable module in ``pre.registration_report()``: covered or not, and why
``LayerHelper``            one curvature block of a module (rows, gradient matrix); subclass for new types
``LayerGroup``             a module made of several blocks (grouped convolutions, attention)
``register_layer_helper``  register the helper factory of a module type, globally
``LayerState``             one block's state: helper, curvature, solver state, statistics
``Curvature``              the protocol of a block's damped curvature (products, diagonal, rows)
``DirectCurvature``        a block solved in closed form (embeddings, normalisation layers)
``KronRows``               K-FAC's Kronecker curvature kept as rows (CG-FAC's ``curvature="kron"``)
``KronFactors``            K-FAC's Kronecker curvature as explicit factors ``A``, ``G``
``ExactRows``              the exact empirical-Fisher block of a layer (``curvature="exact"``)
``Solver``                 the interface of a solve method (``supports``, ``cost``, ``solve``)
``register_solver``        register a solver class under its name (``solver=`` of CG-FAC)
``optim``                  module: optimizers owning the update (quadratic-model step, adaptive damping)
``checkpoint``             module: ``full_state_dict`` of every rank, ``save_atomic``
``curvature``              module: the curvature implementations (``RowWindow``, ``RunningFactors``, ...)
``solvers``                module: CG, low-rank, eigen and automatic solvers, and their registry
=========================  ==========================================================================

Layout (see also the README's "How the code is organised"): :mod:`cgfac.precondition` (the
preconditioner: the step, CG-FAC, K-FAC, the direction stages, the distribution strategies,
checkpoint plumbing, state and memory budget), :mod:`cgfac.capture` (registration and what the
hooks record), :mod:`cgfac.layers`, :mod:`cgfac.curvature`, :mod:`cgfac.solvers`,
:mod:`cgfac.distributed` (collectives and work assignment, FSDP2's owner exchange), :mod:`cgfac.optim`
(the optimizers owning the update, ``TransformerKFAC``), :mod:`cgfac.integrations`; and the modules
:mod:`cgfac.config` (options, hyperparameters, validators), :mod:`cgfac.losses` (likelihoods, the
true Fisher's sampling), :mod:`cgfac.rows`, :mod:`cgfac.dtensor` and :mod:`cgfac.checkpoint`.
"""

from cgfac import checkpoint, curvature, optim, solvers
from cgfac.curvature import Curvature, DirectCurvature, ExactRows, KronFactors, KronRows
from cgfac.layers import LayerGroup, LayerHelper, register_layer_helper
from cgfac.precondition.base import Preconditioner, ReportEntry
from cgfac.precondition.cgfac import CGFAC
from cgfac.precondition.kfac import KFAC
from cgfac.precondition.state import LayerState
from cgfac.solvers import Solver, register_solver

__all__ = [
    "CGFAC", "KFAC", "Curvature", "DirectCurvature", "ExactRows", "KronFactors", "KronRows", "LayerGroup",
    "LayerHelper", "LayerState", "Preconditioner", "ReportEntry", "Solver", "checkpoint", "curvature", "optim",
    "register_layer_helper", "register_solver", "solvers",
]
__version__ = "0.1.0"
