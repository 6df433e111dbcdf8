"""The preconditioners: the step's data flow, CG-FAC and K-FAC, and what they keep.

* :mod:`cgfac.precondition.base`: :class:`~cgfac.precondition.base.Preconditioner`, the base of both
  (hooks, the step's data flow, reports, checkpoints).
* :mod:`cgfac.precondition.cgfac`: CG-FAC; :mod:`cgfac.precondition.kfac`: K-FAC.
* :mod:`cgfac.precondition.state`: each block's :class:`~cgfac.precondition.state.LayerState`.
* :mod:`cgfac.precondition.transforms`: the direction stages (graft, KL clip, vanishing-step check),
  with :mod:`cgfac.precondition.graft` (RMSProp's step that the graft rescales to).
* :mod:`cgfac.precondition.strategies`: the distribution strategies (everything in a step that
  depends on processes and sharding), on the collectives of :mod:`cgfac.distributed`.
* :mod:`cgfac.precondition.persist`: the checkpoint plumbing of ``state_dict``/``load_state_dict``.
* :mod:`cgfac.precondition.memory`: the memory budget, each block's state sized before it is allocated.

The public names are re-exported by :mod:`cgfac` (``cgfac.CGFAC``, ``cgfac.KFAC``,
``cgfac.Preconditioner``, ``cgfac.LayerState``, ...).
"""
