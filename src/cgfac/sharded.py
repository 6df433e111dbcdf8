"""Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``): gradients as ``DTensor``.

Under FSDP2 a parameter and its ``.grad`` are ``DTensor`` shards (by default rows, ``Shard(0)``,
over the data-parallel mesh); the gradient is already averaged over ranks (reduce-scatter). The
preconditioners read a layer's ``∇W`` as the full matrix (:func:`full`, an all-gather of the
shards: a collective that every rank runs for every layer, in the same order) and write the
direction back as this rank's shard (:func:`write_shard`, no communication). Curvature rows come
from the module's inputs and output gradients, which FSDP2 leaves as plain local tensors, so
the rest is data parallelism as with DDP.

Plain tensors pass through both functions unchanged.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor

try:  # torch.distributed may be built without DTensor
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or a ``DTensor``'s ``full_tensor()`` (an all-gather)."""
    return cast(Any, t).full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's part: ``t`` itself, or a ``DTensor``'s local shard (no communication)."""
    return cast(Any, t).to_local() if is_sharded(t) else t


def write_shard(dst: Tensor, value: Tensor, row_start: int = 0) -> None:
    """Copy ``value``, the rows ``row_start : row_start + len(value)`` (dim 0) of the whole
    tensor, into ``dst``: into those rows of a plain tensor, or into the part of them in this
    rank's shard of a ``DTensor`` (offsets by ``dst``'s placements; no communication)."""
    if not is_sharded(dst):
        dst[row_start: row_start + value.shape[0]].copy_(value.reshape(value.shape[0], *dst.shape[1:]))
        return
    value = value.reshape(value.shape[0], *dst.shape[1:])
    d: Any = dst
    shape, offset = compute_local_shape_and_global_offset(d.shape, d.device_mesh, d.placements)
    lo, hi = max(offset[0], row_start), min(offset[0] + shape[0], row_start + value.shape[0])
    if lo >= hi or 0 in shape:
        return
    rest = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
    full_rest = tuple(slice(None) for _ in rest)
    into = (slice(lo - offset[0], hi - offset[0]), *full_rest)
    part = (slice(lo - row_start, hi - row_start), *rest)
    d.to_local()[into].copy_(value[part])
