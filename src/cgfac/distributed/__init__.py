"""Distribution across ``torch.distributed`` processes.

* :mod:`cgfac.distributed.collectives`: the work assignment (each layer's owner rank, balanced by
  cost) and the collectives the preconditioners run, with their timeouts and faults
  (:class:`~cgfac.distributed.collectives.CollectiveError`), and the communication cost model.
* :mod:`cgfac.distributed.sharded`: FSDP2's sharded gradients, the owner exchange of their rows.

The distribution strategies of a step that use them are in :mod:`cgfac.precondition.strategies`.
"""
