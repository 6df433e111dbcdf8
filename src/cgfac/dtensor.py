"""Tensor-level ``DTensor`` helpers (FSDP2's sharded parameters and gradients): what a layer needs to
read and write its gradient whether or not it is sharded. No communication of its own beyond
``DTensor.full_tensor()``; the routes of sharded gradients are in :mod:`cgfac.distributed.sharded`.
Plain tensors pass through :func:`full`, :func:`local` and :func:`write_shard` unchanged."""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor

try:  # torch.distributed may be built without DTensor
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]

__all__ = ["DTensor", "Shard", "add_full", "full", "is_sharded", "local", "write_shard"]


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


def add_full(dst: Tensor, value: Tensor, alpha: float = 1.0) -> None:
    """``dst += alpha·value`` for ``value`` the whole tensor: into a plain ``dst``, or into the part of
    a ``DTensor``'s shard this rank holds (offsets by its placements; no communication)."""
    if not is_sharded(dst):
        dst.add_(value, alpha=alpha)
        return
    d: Any = dst
    shape, offset = compute_local_shape_and_global_offset(d.shape, d.device_mesh, d.placements)
    if 0 in shape:
        return
    d.to_local().add_(value[tuple(slice(o, o + n) for o, n in zip(offset, shape))], alpha=alpha)
