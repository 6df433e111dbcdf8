"""Work assignment and communication across ``torch.distributed`` processes.

With data parallelism (``DistributedDataParallel``) every rank holds the same averaged ``∇W`` and
its own rows. A :class:`WorkAssignment` gives each layer one owner rank, balancing a per-layer
cost by the greedy longest-processing-time rule (largest cost first, to the least-loaded rank);
the owner does the layer's expensive work and broadcasts the result. A single process (or none
initialised) owns everything and every collective is a no-op.

Bytes are counted as the payload each rank contributes to collectives (a gather: the rows it
sends; a broadcast: the source's tensor; an all-reduce: the tensor). A ring all-reduce puts
about ``2 (N − 1)/N`` times its payload on the wire, a tree broadcast ``N − 1`` copies.

Faults: every collective waits at most ``timeout`` seconds (default: the process group's own
timeout) and a failure, a timeout or a peer that died (gloo: "Connection closed by peer") is
raised as :class:`CollectiveError` naming the collective and the rank. Decisions that change which
collectives a step runs (skip the step, leave a layer out) are agreed on by every rank first
(:meth:`WorkAssignment.agree`), so one rank's non-finite values never make ranks diverge.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cgfac.rows import Rows

__all__ = ["BUCKET_BYTES", "COMM_METHODS", "CollectiveError", "WorkAssignment", "choose_comm", "comm_bytes",
           "greedy_assignment"]

BUCKET_BYTES = 25 * 2**20


class CollectiveError(RuntimeError):
    """A collective of the preconditioner failed or timed out (typically: another rank died)."""


def _finish(pending: list[tuple[list[Tensor], Tensor, Any]], wait: Callable[[Any], None]) -> None:
    """Wait for each asynchronous collective, then copy its flat buffer back into its tensors."""
    for tensors, flat, work in pending:
        wait(work)
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


COMM_METHODS = ("gather-rows", "reduce-factors")


def comm_bytes(d_in: int, d_out: int, rows: int, world: int, *, row_width: int | None = None,
               number_bytes: int = 4) -> dict[str, float]:
    """Mean bytes per rank and step that bring one layer's curvature to its owner (CG-FAC, kron).

    * ``"gather-rows"``: every rank but the owner sends its ``rows`` (padded to the most rows of
      any rank) of width ``row_width`` (default ``d_in + d_out``): ``(N − 1)/N · rows · width``.
    * ``"reduce-factors"``: every rank contributes its factor sums ``aᵀa`` and ``gᵀg`` to a
      reduction on the owner: ``d_in² + d_out²``.

    The direction's broadcast from the owner is the same for both and is not counted.
    """
    width = d_in + d_out if row_width is None else row_width
    return {"gather-rows": (world - 1) / world * rows * width * number_bytes,
            "reduce-factors": float(d_in * d_in + d_out * d_out) * number_bytes}


def choose_comm(d_in: int, d_out: int, rows: int, world: int, *, row_width: int | None = None) -> str:
    """The method of :func:`comm_bytes` that sends fewer bytes (ties: gathering rows)."""
    b = comm_bytes(d_in, d_out, rows, world, row_width=row_width)
    return "reduce-factors" if b["reduce-factors"] < b["gather-rows"] else "gather-rows"


class WorkAssignment:
    """Which rank owns which layer, and the collectives the preconditioners need."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, timeout: float | None = None) -> None:
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"collective_timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = timeout
        self.group = process_group
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        self.rank = dist.get_rank(process_group) if self.active else 0
        self.world = dist.get_world_size(process_group) if self.active else 1
        self.owners: dict[str, int] = {}
        self.bytes_sent = 0
        self._group_ranks: list[int] | None = None

    @property
    def group_ranks(self) -> list[int]:
        """The global ranks of the process group, in group rank order."""
        if self._group_ranks is None:
            self._group_ranks = (dist.get_process_group_ranks(self.group or dist.group.WORLD) if self.active
                                 else [0])
        return self._group_ranks

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
    def _fail(self, what: str, err: BaseException) -> CollectiveError:
        limit = f"{self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
        return CollectiveError(
            f"cgfac: collective '{what}' failed on rank {self.rank} of {self.world} (waited at most {limit}): "
            f"{err}. Another rank probably died, raised or hangs; every rank stops here. Set the process "
            "group's timeout (init_process_group(timeout=...)) to bound how long ranks wait.")

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as err:
            raise self._fail(what, err) from err

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run an asynchronous collective and wait for it (bounded, errors named)."""
        try:
            work = fn(*args, group=self.group, async_op=True, **kwargs)
        except RuntimeError as err:
            raise self._fail(what, err) from err
        self._wait(work, what)

    def agree(self, flags: list[int], device: torch.device) -> list[int]:
        """Element-wise maximum of small non-negative integers over ranks (one all-reduce): a
        decision any rank takes (skip the step, leave a layer out) is taken by all."""
        if not self.active or not flags:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.int64, device=device)
        self._call("agree on skipped steps and layers", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        self.bytes_sent += t.numel() * t.element_size()
        return [int(v) for v in t.tolist()]

    def gather_objects(self, obj: Any, dst: int | None) -> list[Any] | None:
        """Every rank's picklable ``obj`` (rank order) on ``dst`` (None elsewhere), or on every
        rank when ``dst`` is None."""
        if not self.active:
            return [obj]
        try:
            if dst is None:
                out: list[Any] = [None] * self.world
                dist.all_gather_object(out, obj, group=self.group)
                return out
            gathered: list[Any] | None = [None] * self.world if self.rank == dst else None
            dist.gather_object(obj, gathered, dst=self._global_rank(dst), group=self.group)
            return gathered
        except RuntimeError as err:
            raise self._fail("gather the preconditioner state", err) from err

    def exchange_counts(self, counts: list[tuple[int, int]], device: torch.device) -> list[list[tuple[int, int]]]:
        """All ranks' ``(rows, samples)`` per layer: result[layer][rank]."""
        if not self.active:
            return [[c] for c in counts]
        local = torch.tensor(counts, dtype=torch.int64, device=device).reshape(-1)
        out = [torch.empty_like(local) for _ in range(self.world)]
        self._call("exchange row counts", dist.all_gather, out, local)
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
        self._call(f"gather curvature rows to rank {owner}", dist.gather, packed, bucket, dst=self._global_rank(owner))
        if bucket is None:  # not the owner
            self.bytes_sent += packed.numel() * packed.element_size()
            return None
        parts = [b[:c[0]] for b, c in zip(bucket, counts)]
        stacked = torch.cat(parts)
        return Rows(a=stacked[:, :d_in], g=stacked[:, d_in:], n=sum(c[1] for c in counts))

    def all_to_all(self, send: list[Tensor], recv_sizes: list[int], what: str) -> list[Tensor]:
        """One all-to-all: the flat ``send[r]`` goes to rank ``r``; returns the flat tensor each
        rank sent here (``recv_sizes[r]`` numbers from rank ``r``). All of one dtype and device;
        sizes may differ (and be zero). Bytes: what goes to the other ranks."""
        if not self.active:
            return list(send)
        if len(send) != self.world or len(recv_sizes) != self.world:
            raise ValueError(f"all_to_all needs one tensor and one size per rank ({self.world})")
        flat = torch.cat(send)
        out = flat.new_empty(sum(recv_sizes))
        self._call(what, dist.all_to_all_single, out, flat, output_split_sizes=list(recv_sizes),
                   input_split_sizes=[t.numel() for t in send])
        self.bytes_sent += (flat.numel() - send[self.rank].numel()) * flat.element_size()
        return list(out.split(list(recv_sizes)))

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
            try:
                work = dist.all_reduce(flat, group=self.group, async_op=True)
            except RuntimeError as err:
                raise self._fail("all-reduce curvature factors", err) from err
            pending.append((bucket, flat, work))
            self.bytes_sent += flat.numel() * flat.element_size()
        _finish(pending, lambda w: self._wait(w, "all-reduce curvature factors"))

    def broadcast_from_owners(self, items: list[tuple[int, list[Tensor]]]) -> None:
        """Broadcast each item's tensors (in place) from its source rank, asynchronously."""
        if not self.active:
            return
        pending = []
        for src, tensors in items:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            if src == self.rank:
                self.bytes_sent += flat.numel() * flat.element_size()
            try:
                work = dist.broadcast(flat, src=self._global_rank(src), group=self.group, async_op=True)
            except RuntimeError as err:
                raise self._fail(f"broadcast from rank {src}", err) from err
            pending.append((tensors, flat, work))
        _finish(pending, lambda w: self._wait(w, "broadcast directions or decompositions from their owners"))

    def reduce_to_owners(self, items: list[tuple[int, list[Tensor]]]) -> None:
        """Sum each item's tensors over ranks onto its owner (in place there), asynchronously;
        other ranks' tensors are left unspecified."""
        if not self.active:
            return
        by_owner: dict[int, list[Tensor]] = {}
        for owner, tensors in items:
            by_owner.setdefault(owner, []).extend(tensors)
        pending = []
        for owner, tensors in sorted(by_owner.items()):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            try:
                work = dist.reduce(flat, dst=self._global_rank(owner), op=dist.ReduceOp.SUM, group=self.group,
                                   async_op=True)
            except RuntimeError as err:
                raise self._fail(f"reduce curvature factors to rank {owner}", err) from err
            self.bytes_sent += flat.numel() * flat.element_size()
            pending.append((tensors if owner == self.rank else [], flat, work))
        _finish(pending, lambda w: self._wait(w, "reduce curvature factors to their owners"))
