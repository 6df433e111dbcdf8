"""Work assignment and communication across ``torch.distributed`` processes.

With data parallelism (``DistributedDataParallel``) every rank holds the same averaged ``∇W`` and
its own rows. A :class:`WorkAssignment` gives each layer one owner rank, balancing a per-layer
cost by the greedy longest-processing-time rule (largest cost first, to the least-loaded rank);
the owner does the layer's expensive work and broadcasts the result. A single process (or none
initialised) owns everything and every collective is a no-op.

Bytes are counted as the payload each rank contributes to collectives (a gather: the rows it
sends; a broadcast: the source's tensor; an all-reduce: the tensor). A ring all-reduce puts
about ``2 (N − 1)/N`` times its payload on the wire, a tree broadcast ``N − 1`` copies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cgfac.layers import Rows

BUCKET_BYTES = 25 * 2**20


def _finish(pending: list[tuple[list[Tensor], Tensor, Any]]) -> None:
    """Wait for each asynchronous collective, then copy its flat buffer back into its tensors."""
    for tensors, flat, work in pending:
        work.wait()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].reshape(t.shape))
            offset += t.numel()


def greedy_assignment(costs: dict[str, float], world: int) -> dict[str, int]:
    """Longest processing time first: layers by decreasing cost (ties by name), each to the
    least-loaded rank (ties to the lowest rank)."""
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


class WorkAssignment:
    """Which rank owns which layer, and the collectives the preconditioners need."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        self.rank = dist.get_rank(process_group) if self.active else 0
        self.world = dist.get_world_size(process_group) if self.active else 1
        self.owners: dict[str, int] = {}
        self.bytes_sent = 0

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # --- assignment ---------------------------------------------------------------------------
    def assign(self, costs: dict[str, float]) -> None:
        """Fix the owners by :func:`greedy_assignment` of the per-layer costs."""
        self.owners = greedy_assignment(costs, self.world)

    def owner(self, name: str) -> int:
        return self.owners.get(name, 0)

    def owns(self, name: str) -> bool:
        return not self.active or self.owner(name) == self.rank

    # --- collectives --------------------------------------------------------------------------
    def exchange_counts(self, counts: list[tuple[int, int]], device: torch.device) -> list[list[tuple[int, int]]]:
        """All ranks' ``(rows, samples)`` per layer: result[layer][rank]."""
        if not self.active:
            return [[c] for c in counts]
        local = torch.tensor(counts, dtype=torch.int64, device=device).reshape(-1)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        self.bytes_sent += local.numel() * local.element_size()
        per_rank = [o.reshape(-1, 2).tolist() for o in out]
        return [[tuple(per_rank[r][i]) for r in range(self.world)] for i in range(len(counts))]

    def gather_rows(self, rows: Rows | None, counts: list[tuple[int, int]], owner: int, d_in: int, d_out: int,
                    dtype: torch.dtype, device: torch.device) -> Rows | None:
        """Concatenate every rank's rows (rank order) on ``owner``; None elsewhere or if none."""
        if not self.active:
            return rows
        max_rows = max(c[0] for c in counts)
        if max_rows == 0:
            return None
        packed = torch.zeros(max_rows, d_in + d_out, dtype=dtype, device=device)
        if rows is not None:
            packed[: rows.a.shape[0], :d_in] = rows.a
            packed[: rows.a.shape[0], d_in:] = rows.g
        mine = self.rank == owner
        bucket = [torch.empty_like(packed) for _ in range(self.world)] if mine else None
        dist.gather(packed, bucket, dst=self._global_rank(owner), group=self.group)
        if not mine:
            self.bytes_sent += packed.numel() * packed.element_size()
            return None
        parts = [b[:c[0]] for b, c in zip(bucket, counts)]
        stacked = torch.cat(parts)
        return Rows(a=stacked[:, :d_in], g=stacked[:, d_in:], n=sum(c[1] for c in counts))

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum in place across ranks: flattened into buckets, all-reduced asynchronously."""
        if not self.active or not tensors:
            return
        buckets: list[list[Tensor]] = [[]]
        size = 0
        for t in tensors:
            if buckets[-1] and size + t.numel() * t.element_size() > BUCKET_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel() * t.element_size()
        pending = []
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            pending.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
            self.bytes_sent += flat.numel() * flat.element_size()
        _finish(pending)

    def broadcast_from_owners(self, items: list[tuple[int, list[Tensor]]]) -> None:
        """Broadcast each item's tensors (in place) from its source rank, asynchronously."""
        if not self.active:
            return
        pending = []
        for src, tensors in items:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            if src == self.rank:
                self.bytes_sent += flat.numel() * flat.element_size()
            work = dist.broadcast(flat, src=self._global_rank(src), group=self.group, async_op=True)
            pending.append((tensors, flat, work))
        _finish(pending)
