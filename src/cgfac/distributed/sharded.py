"""Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``): gradients as ``DTensor``.

Under FSDP2 a parameter and its ``.grad`` are ``DTensor`` shards (by default rows, ``Shard(0)``,
over the data-parallel mesh; torch.chunk sizes: ``⌈D/N⌉`` rows per rank, the last ranks fewer or
none); the gradient is already averaged over ranks (reduce-scatter). Curvature rows come from the
module's inputs and output gradients, which FSDP2 leaves as plain local tensors, so the
curvature is data parallel exactly as under DDP. A layer's gradient reaches its solve in one of
two ways (``sharded_grads`` of the preconditioners; ``layer_stats()[name]["sharded"]`` says which):

* **owner** (:class:`OwnerExchange`; ``"auto"`` wherever it applies): each layer has an owner
  rank (:class:`cgfac.distributed.collectives.WorkAssignment`). One all-to-all sends every rank's rows of
  each layer's gradient to that layer's owner, which alone assembles the full ``∇W``, solves,
  and a second all-to-all returns to every rank only its rows of the direction (with a flag
  "keep the plain gradient" and the owner's ``⟨X, ∇W⟩`` for the KL clip). A rank holds full
  gradients and directions of its own layers only; per step it receives about
  ``2 (N − 1)/N · P_own`` numbers (``P_own``: its layers' parameters, ``≈ P/N``). It applies
  when every gradient of the layer is a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh of exactly
  the preconditioner's process group, in rank order, with torch.chunk row counts
  (:func:`row_layout`).
* **all-gather** (:func:`full`, ``DTensor.full_tensor()``, the fallback and
  ``sharded_grads="all-gather"``): every rank all-gathers every layer's full gradient (layers in
  the same order on every rank), the direction is computed as under DDP and every rank writes
  its own rows (:func:`write_shard`, no communication). Every rank receives
  ``(N − 1)/N · P`` numbers and holds the whole model's gradient during the step.

Plain tensors pass through :func:`full`, :func:`local` and :func:`write_shard` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor

from cgfac.dtensor import DTensor, Shard, compute_local_shape_and_global_offset, full, is_sharded, local, write_shard

__all__ = ["DTensor", "OwnerExchange", "chunk_rows", "full", "is_sharded", "local", "row_layout", "write_shard"]

if TYPE_CHECKING:
    from cgfac.distributed.collectives import WorkAssignment


class ExchangeUnit(Protocol):
    """What the owner scheme needs of a block (a :class:`cgfac.layers.LayerHelper` is one): the
    parameters its gradient matrix is made of, and the conversions between their rows and the matrix."""

    @property
    def device(self) -> torch.device: ...

    def grad_parts(self) -> list[tuple[Tensor, slice | None]]: ...

    def matrix_from_parts(self, parts: Sequence[Tensor]) -> Tensor: ...

    def parts_of_matrix(self, x: Tensor) -> list[Tensor]: ...


def chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """The rows ``[start, stop)`` of each of ``world`` ranks when ``rows`` rows are split as
    ``torch.chunk`` splits them (FSDP2's ``Shard(0)``): ``⌈rows/world⌉`` each, the last ranks
    fewer or none."""
    size = -(-rows // world) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def row_layout(t: Tensor, group_ranks: list[int], rank: int) -> list[tuple[int, int]] | str:
    """The rows (dim 0) of ``t`` each rank of the process group holds, ``[(start, stop)]`` in
    group rank order, when ``t`` is a ``DTensor`` sharded by rows the way the owner scheme needs
    (``Shard(0)`` on a 1-D mesh whose ranks are ``group_ranks`` in order, torch.chunk row
    counts, checked against this rank's shard); otherwise the reason it is not (a str)."""
    if not is_sharded(t):
        return "not a DTensor"
    d: Any = t
    mesh, placements = d.device_mesh, tuple(d.placements)
    if mesh.ndim != 1:
        return f"on a {mesh.ndim}-D device mesh (the owner scheme needs a 1-D mesh)"
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        return f"placements {placements} (the owner scheme needs Shard(0))"
    mesh_ranks = [int(r) for r in mesh.mesh.reshape(-1).tolist()]
    if mesh_ranks != list(group_ranks):
        return (f"mesh ranks {mesh_ranks} are not the preconditioner's process group's ranks "
                f"{list(group_ranks)} in order")
    layout = chunk_rows(d.shape[0], len(group_ranks))
    shape, offset = compute_local_shape_and_global_offset(d.shape, mesh, placements)
    start, stop = layout[rank]
    if tuple(d.to_local().shape) != tuple(shape) or (stop > start and (offset[0], shape[0]) != (start, stop - start)):
        return f"this rank's shard (rows {offset[0]}:{offset[0] + shape[0]}) is not torch.chunk's {start}:{stop}"
    return layout


@dataclass
class _Part:
    """Rows ``[lo, hi)`` of one parameter of a unit: its gradient, and the rows each rank holds."""

    grad: Tensor  # the DTensor gradient
    lo: int
    hi: int
    layout: list[tuple[int, int]]
    row_shape: tuple[int, ...]  # the shape of one row (the parameter's shape without dim 0)

    def rows_of(self, rank: int) -> tuple[int, int]:
        """The unit's rows that ``rank`` holds, in the parameter's row numbers (may be empty)."""
        start, stop = self.layout[rank]
        lo, hi = max(self.lo, start), min(self.hi, stop)
        return lo, max(lo, hi)

    def numel(self, rank: int) -> int:
        lo, hi = self.rows_of(rank)
        return (hi - lo) * math.prod(self.row_shape)

    def local_rows(self, rank: int) -> Tensor:
        """This rank's rows of the unit, a view of its local shard."""
        lo, hi = self.rows_of(rank)
        start = self.layout[rank][0]
        return local(self.grad)[lo - start: hi - start]


class OwnerExchange:
    """The owner scheme of one step for units whose gradients are all row-sharded (see the
    module docstring): :meth:`gather` brings each unit's rows from every rank to its owner,
    :meth:`scatter` returns each rank its rows of the direction. Every rank builds the same
    exchange (units in layer order, owners known); each is one all-to-all per dtype.

    Args:
        units: ``(name, helper, owner, layouts)`` in layer order; ``layouts[k]`` is
            :func:`row_layout` of the ``k``-th of ``helper.grad_parts()``.
        dtypes: each unit's compute dtype (directions travel in it).
    """

    def __init__(self, dist: WorkAssignment, units: list[tuple[str, ExchangeUnit, int, list[list[tuple[int, int]]]]],
                 dtypes: dict[str, torch.dtype]) -> None:
        self.dist = dist
        self.rank, self.world = dist.rank, dist.world
        self.helpers = {name: helper for name, helper, _, _ in units}
        self.owner = {name: owner for name, _, owner, _ in units}
        self.dtypes = dtypes
        self.parts: dict[str, list[_Part]] = {}
        for name, helper, _, layouts in units:
            self.parts[name] = []
            for (p, sl), layout in zip(helper.grad_parts(), layouts):
                lo, hi, _ = (sl or slice(None)).indices(p.shape[0])
                self.parts[name].append(_Part(cast(Tensor, p.grad), lo, hi, layout, tuple(p.shape[1:])))

    def _by_dtype(self, dtype_of: dict[str, torch.dtype]) -> dict[torch.dtype, list[str]]:
        groups: dict[torch.dtype, list[str]] = {}
        for name in self.helpers:
            groups.setdefault(dtype_of[name], []).append(name)
        return groups

    def gather(self) -> dict[str, Tensor]:
        """The full ``∇W`` (``d_out × d_in``, in the gradient's dtype) of every unit this rank owns:
        every rank sends its rows of each unit to the unit's owner (no rank sends or receives any
        other unit's rows)."""
        grad_dtype = {name: _promote([local(p.grad).dtype for p in parts]) for name, parts in self.parts.items()}
        out: dict[str, Tensor] = {}
        for dtype, names in self._by_dtype(grad_dtype).items():
            device = self.helpers[names[0]].device
            send: list[list[Tensor]] = [[] for _ in range(self.world)]
            for name in names:
                for part in self.parts[name]:
                    send[self.owner[name]].append(part.local_rows(self.rank).reshape(-1).to(dtype))
            mine = [n for n in names if self.owner[n] == self.rank]
            sizes = [sum(part.numel(src) for n in mine for part in self.parts[n]) for src in range(self.world)]
            received = self.dist.all_to_all([_cat(s, dtype, device) for s in send], sizes,
                                            "gather sharded gradients to their owners")
            offsets = [0] * self.world
            for name in mine:
                rows = []
                for part in self.parts[name]:
                    pieces = []
                    for src in range(self.world):
                        size = part.numel(src)
                        lo, hi = part.rows_of(src)
                        pieces.append(received[src][offsets[src]: offsets[src] + size].reshape(hi - lo,
                                                                                                *part.row_shape))
                        offsets[src] += size
                    rows.append(torch.cat(pieces))
                out[name] = self.helpers[name].matrix_from_parts(rows)
        return out

    def scatter(self, directions: dict[str, tuple[Tensor | None, float]]) -> dict[str, tuple[list[Tensor] | None,
                                                                                             float]]:
        """Every unit's direction, from its owner (``directions[name] = (X or None, ⟨X, ∇W⟩)`` for
        the units this rank owns) to every rank as ``(this rank's rows of each part, ⟨X, ∇W⟩)``,
        or ``(None, 0)`` where the owner keeps the plain gradient. Each message carries a flag and
        ``⟨X, ∇W⟩`` per unit, then the receiver's rows of each part."""
        out: dict[str, tuple[list[Tensor] | None, float]] = {}
        for dtype, names in self._by_dtype(self.dtypes).items():
            device = self.helpers[names[0]].device
            send: list[list[Tensor]] = [[] for _ in range(self.world)]
            for name in names:
                if self.owner[name] != self.rank:
                    continue
                x, vg = directions[name]
                values = None if x is None else self.helpers[name].parts_of_matrix(x)
                header = torch.tensor([0.0 if x is None else 1.0, vg], dtype=dtype).to(device)
                for dst in range(self.world):
                    send[dst].append(header)
                    for k, part in enumerate(self.parts[name]):
                        lo, hi = part.rows_of(dst)
                        if values is None:
                            send[dst].append(torch.zeros(part.numel(dst), dtype=dtype, device=device))
                        else:
                            send[dst].append(values[k][lo - part.lo: hi - part.lo].reshape(-1).to(dtype))
            sizes = [sum(2 + sum(part.numel(self.rank) for part in self.parts[n]) for n in names
                         if self.owner[n] == src) for src in range(self.world)]
            received = self.dist.all_to_all([_cat(s, dtype, device) for s in send], sizes,
                                            "scatter directions from their owners")
            offsets = [0] * self.world
            headers: list[Tensor] = []
            pieces: dict[str, list[Tensor]] = {}
            for name in names:
                src = self.owner[name]
                buf, at = received[src], offsets[src]
                headers.append(buf[at: at + 2])
                at += 2
                pieces[name] = []
                for part in self.parts[name]:
                    lo, hi = part.rows_of(self.rank)
                    size = part.numel(self.rank)
                    pieces[name].append(buf[at: at + size].reshape(hi - lo, *part.row_shape))
                    at += size
                offsets[src] = at
            flags = torch.cat(headers).tolist()  # one read of every header (one device sync)
            for i, name in enumerate(names):
                flag, vg = flags[2 * i], flags[2 * i + 1]
                out[name] = (pieces[name], vg) if flag == 1 else (None, 0.0)
        return out

    def write(self, name: str, pieces: list[Tensor], scale: float) -> None:
        """Write this rank's rows of a unit's direction, times ``scale``, into its local shards."""
        for part, piece in zip(self.parts[name], pieces):
            if piece.numel():
                part.local_rows(self.rank).copy_(piece * scale)


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _cat(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=dtype, device=device)
