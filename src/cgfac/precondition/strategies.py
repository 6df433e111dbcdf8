"""Distribution strategies: how one step's gradients, decisions and directions reach each process.

:meth:`cgfac.precondition.base.Preconditioner.step` is the same data flow everywhere; one :class:`Distribution`,
chosen at construction (:func:`make_distribution`), does whatever depends on processes and
sharding through one interface:

* :meth:`~Distribution.agree`: each layer's ``∇W`` and whether the step is kept (every rank decides the same);
* :meth:`~Distribution.gather`: bring ``∇W`` to the layer's solver (the owner scheme);
* :meth:`~Distribution.solves_here`, :meth:`~Distribution.check`, :meth:`~Distribution.settle`: who
  solves, and how a direction's validity is decided (at once, or in the one device read);
* :meth:`~Distribution.share`, :meth:`~Distribution.scatter`: bring each rank the directions it
  writes, with ``⟨X, ∇W⟩`` for the KL clip; :meth:`~Distribution.write`: into ``.grad``.

The strategies never act on the preconditioner: they read what :class:`StepHost` declares and
return their decisions in the :class:`~cgfac.precondition.transforms.StepData` (``False`` from
:meth:`~Distribution.agree` or :meth:`~Distribution.settle`: skip the step; ``step.undo``: layers whose
rows of this step are forgotten; a ``"fallback"`` in a layer's stats with no direction: it keeps its
plain gradient), which :meth:`cgfac.precondition.base.Preconditioner.step` carries out.

The strategies:

* :class:`SingleProcess`: one process, one device read per step (every check deferred to
  :meth:`~Distribution.settle`, :meth:`SingleProcess.read_back`).
* :class:`WholeLayerOwners`: data parallel (DDP): every rank holds the whole averaged ``∇W``; each
  layer has an owner rank (:class:`cgfac.distributed.collectives.WorkAssignment`); decisions are agreed by an
  all-reduce, directions computed only on owners are broadcast. Also one process for a
  preconditioner that checks as it goes (K-FAC), where every collective is a no-op.
* :class:`ShardedAllGather`: FSDP2, every rank all-gathers every layer's sharded gradient and
  writes its own rows (``sharded_grads="all-gather"``, :mod:`cgfac.distributed.sharded`).
* :class:`ShardedOwners`: FSDP2's owner scheme (:class:`cgfac.distributed.sharded.OwnerExchange`) for every
  layer whose gradients allow it; the others are all-gathered (``"auto"``) or raise (``"owner"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from cgfac.distributed import sharded
from cgfac.distributed.collectives import WorkAssignment
from cgfac.dtensor import local
from cgfac.layers import LayerHelper
from cgfac.precondition.state import LayerState
from cgfac.precondition.transforms import StepData

__all__ = ["Distribution", "ShardedAllGather", "ShardedOwners", "SingleProcess", "StepHost", "WholeLayerOwners",
           "grads_finite", "make_distribution"]

logger = logging.getLogger("cgfac")
# How a layer's gradient reaches its solve this step, agreed by the maximum over ranks: the owner
# scheme for row-sharded gradients, the whole matrix on every rank, or missing (plain gradient).
_OWNER, _WHOLE, _MISSING = 0, 1, 2


class Enabled(Protocol):
    @property
    def enabled(self) -> bool: ...


class StepHost(Protocol):
    """What a strategy reads of the preconditioner it serves (:class:`cgfac.precondition.base.Preconditioner`):
    the covered blocks in layer order and their states (the one-read step's statistics are filled in
    place), the process group with each layer's owner, the module whose gradients are checked, how
    FSDP2's sharded gradients reach a solve, whether one process may read the device once per step,
    and whether the KL clip (products ``⟨X, ∇W⟩``) and the graft stages are enabled."""

    @property
    def layers(self) -> dict[str, LayerHelper]: ...

    @property
    def states(self) -> dict[str, LayerState]: ...

    @property
    def dist(self) -> WorkAssignment: ...

    @property
    def model(self) -> Any: ...

    @property
    def sharded_grads(self) -> str: ...

    @property
    def reads_once(self) -> bool: ...

    @property
    def clipping(self) -> Enabled: ...

    @property
    def grafting(self) -> Enabled: ...

    def compute_dtype(self, helper: LayerHelper) -> torch.dtype: ...

    def owner_only(self, name: str) -> bool: ...


def grads_finite(parameters: Iterable[Tensor]) -> Tensor:
    """Whether every gradient is finite, as a 0-dim tensor: one reduction (float32 sums, so that a
    float16 sum cannot overflow), no host read."""
    sums = [local(p.grad).sum(dtype=torch.float32) for p in parameters if p.grad is not None]
    if not sums:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum())


def make_distribution(host: StepHost) -> Distribution:
    """The strategy of a preconditioner: by its process group, whether its layers' parameters are
    sharded (FSDP2 ``DTensor``) when it is built, ``sharded_grads`` and whether it reads once."""
    params_sharded = any(sharded.is_sharded(p) for h in host.layers.values() for p, _ in h.grad_parts())
    if not host.dist.active:
        return SingleProcess(host) if host.reads_once and not params_sharded else WholeLayerOwners(host)
    if not params_sharded:
        return WholeLayerOwners(host)
    return ShardedAllGather(host) if host.sharded_grads == "all-gather" else ShardedOwners(host)


class Distribution:
    """The interface (see the module docstring); the defaults are those of one process."""

    name = "single process"

    def __init__(self, host: StepHost) -> None:
        self.host = host
        self.dist = host.dist
        self.owner_routed: set[str] = set()  # this step's layers under the owner scheme
        self.pending: dict[tuple[str, str], Tensor] | None = None  # the one-read step's values to read

    @property
    def defers(self) -> bool:
        """Whether this step's checks wait for the one device read (values stay 0-dim tensors, and
        a finiteness found wrong there is undone after the fact): only :class:`SingleProcess`."""
        return self.pending is not None

    def defer(self, name: str, what: str, value: Tensor) -> None:
        """Leave a check of layer ``name`` (``what``: ``"rows"``, ``"direction"``, ``"product"``;
        a 0-dim tensor, 0 meaning failed) to the one device read; only while :attr:`defers`."""
        if self.pending is None:
            raise RuntimeError("defer: this step does not defer its checks (see Distribution.defers)")
        self.pending[(name, what)] = value

    def agree(self, step: StepData) -> bool:
        """Fill ``step.active`` (every layer with all its gradients: its helper and ``∇W``, a
        placeholder of the right dtype where ``∇W`` arrives at :meth:`gather`) and start its stats;
        False: a gradient is non-finite (on any rank), skip the step."""
        raise NotImplementedError

    def gather(self, step: StepData) -> None:
        """Bring each layer's ``∇W`` to where it is solved (after the rows are collected)."""

    def solves_here(self, name: str) -> bool:
        return True

    def check(self, step: StepData, name: str, x: Tensor | None) -> Tensor | None:
        """A solve's direction as the step continues with it (None: the plain gradient)."""
        return x

    def settle(self, step: StepData) -> bool:
        """Decide what :meth:`check` left open; False: the step was skipped."""
        return True

    def share(self, step: StepData) -> None:
        """Give every rank that writes a layer its direction (``step.directions``)."""

    def holds(self, name: str) -> bool:
        """Whether this rank holds the layer's whole ``∇W`` and direction after :meth:`share`."""
        return True

    def scatter(self, step: StepData) -> None:
        """``step.final``: every layer this rank writes, with what it writes and ``⟨X, ∇W⟩``."""
        raise NotImplementedError

    def write(self, step: StepData) -> None:
        """Write ``step.final`` times ``step.scale`` into the layers' ``.grad``."""
        for name, (x, _) in step.final.items():
            x = cast(Tensor, x)
            self.host.layers[name].set_grad(x.mul_(step.scale) if step.scale != 1.0 else x)


class SingleProcess(Distribution):
    """One process, one device read: every decision that needs a value (finite gradients, rows and
    directions; the KL clip's products) and every statistic is read in one transfer after the
    solves (:meth:`read_back`); with ``graft`` and ``kl_clip`` the grafted products take a second."""

    def agree(self, step: StepData) -> bool:
        self.owner_routed = set()
        self.pending = {}
        host = self.host
        for name, helper in host.layers.items():
            if any(p.grad is None for p, _ in helper.grad_parts()):
                helper.discard_rows()
                continue
            step.active[name] = (helper, cast(Tensor, helper.grad_matrix()).to(host.compute_dtype(helper)))
            step.stats[name] = {"damping": step.damping}
        self.pending[("", "finite")] = grads_finite(host.model.parameters())
        return True

    def check(self, step: StepData, name: str, x: Tensor | None) -> Tensor | None:
        if x is not None and self.pending is not None:
            self.pending[(name, "direction")] = x.sum().isfinite()
            if self.host.clipping.enabled and not self.host.grafting.enabled:
                self.pending[(name, "product")] = torch.vdot(x.reshape(-1), step.active[name][1].reshape(-1))
        return x

    def settle(self, step: StepData) -> bool:
        with torch.profiler.record_function("cgfac.read"):
            self.flags = self.read_back(self.pending or {})
        self.pending = None
        if not self.flags.pop(("", "finite")):
            step.undo = list(step.active)
            return False
        for name in step.active:
            st = step.stats[name]
            if self.flags.get((name, "rows"), 1.0) == 0.0:
                step.undo.append(name)
                st["fallback"] = "non-finite curvature rows (batch not kept)"
                step.directions[name] = None
            elif self.flags.get((name, "direction"), 1.0) == 0.0:
                st["fallback"] = "non-finite direction"
                step.directions[name] = None
        return True

    def scatter(self, step: StepData) -> None:
        names = [name for name in step.active if step.directions[name] is not None]
        flags = self.flags
        if self.host.clipping.enabled and self.host.grafting.enabled:  # products of the grafted directions
            flags = self.read_back({(name, "product"): torch.vdot(cast(Tensor, step.directions[name]).reshape(-1),
                                                                  step.active[name][1].reshape(-1))
                                    for name in names})
        step.final = {name: (step.directions[name], flags.get((name, "product"), 0.0)) for name in names}

    def read_back(self, pending: Mapping[tuple[str, str], Tensor]) -> dict[tuple[str, str], float]:
        """One device-to-host transfer: the ``pending`` 0-dim tensors (returned by key) and every
        0-dim tensor among this step's statistics (replaced by its float in place)."""
        keys: list[Any] = list(pending)
        tensors = [pending[k] for k in keys]
        for name, state in self.host.states.items():
            for key, value in (state.stats or {}).items():
                if isinstance(value, Tensor):
                    keys.append((name, key, "stat"))
                    tensors.append(value)
        if not tensors:
            return {}
        device = tensors[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        values = torch.stack([t.detach().reshape(()).to(device=device, dtype=dtype) for t in tensors]).tolist()
        out: dict[tuple[str, str], float] = {}
        for key, value in zip(keys, values):
            if len(key) == 3:
                cast(dict, self.host.states[key[0]].stats)[key[1]] = value
            else:
                out[key] = value
        return out


class WholeLayerOwners(Distribution):
    """Data parallel (see the module docstring): decisions agreed by one all-reduce, checks as they go."""

    name = "whole-layer owners"

    def __init__(self, host: StepHost) -> None:
        super().__init__(host)
        self.layouts: dict[str, list] = {}  # this step's owner-scheme layers: the row layouts of their parts
        self.notes: dict[str, str] = {}  # the last logged route of each sharded layer

    def route(self, helper: LayerHelper) -> tuple[int, Any]:
        """This rank's view of how a unit's gradient reaches its solve: ``(_MISSING, None)``,
        ``(_OWNER, row layouts of its parts)`` or ``(_WHOLE, why not the owner scheme, or None for
        plain gradients)``."""
        parts = helper.grad_parts()
        if any(p.grad is None for p, _ in parts):
            return _MISSING, None
        if not any(sharded.is_sharded(p.grad) for p, _ in parts):
            return _WHOLE, None
        return self.sharded_route(parts)

    def sharded_route(self, parts: list[tuple[Tensor, slice | None]]) -> tuple[int, Any]:
        if not self.dist.active:
            return _WHOLE, "one process"
        if self.host.sharded_grads == "all-gather":
            return _WHOLE, "sharded_grads='all-gather'"
        return _WHOLE, "the parameters were not sharded when the preconditioner was built"

    def agree(self, step: StepData) -> bool:
        """One all-reduce makes the decisions the same on every rank (finite gradients, each
        layer's route); then sharded layers not under the owner scheme are all-gathered (layers
        in the same order everywhere)."""
        host = self.host
        routes = {name: self.route(helper) for name, helper in host.layers.items()}
        finite = bool(grads_finite(host.model.parameters()))
        flags = [route for route, _ in routes.values()]
        if self.dist.active:
            device = next(iter(host.layers.values())).device
            agreed = self.dist.agree([int(not finite), *flags], device)
            finite, flags = not agreed[0], agreed[1:]
        if not finite:
            return False
        self.layouts = {}
        reasons: dict[str, str] = {}
        grads: dict[str, Tensor] = {}
        for (name, helper), flag, (mine, info) in zip(host.layers.items(), flags, routes.values()):
            if flag == _OWNER:
                self.layouts[name] = info
            elif flag == _WHOLE:
                reason = info if mine == _WHOLE else "not row-sharded as the owner scheme needs on another rank"
                if reason is not None and self.dist.active and host.sharded_grads == "owner":
                    raise ValueError(f"sharded_grads='owner': layer {name!r} cannot use the owner scheme: {reason} "
                                     "(sharded_grads='auto' all-gathers such layers)")
                grads[name] = cast(Tensor, helper.grad_matrix())
                if reason is not None:
                    reasons[name] = reason
        self.owner_routed = set(self.layouts)
        for name, helper in host.layers.items():
            dtype = host.compute_dtype(helper)
            if name in self.layouts:  # the owner scheme: ∇W arrives at gather (once owners are assigned)
                grad = torch.empty(0, dtype=dtype, device=helper.device)  # dtype and device only
            elif name in grads:
                grad = grads[name]
            else:
                helper.discard_rows()
                continue
            step.active[name] = (helper, grad.to(dtype))
            step.stats[name] = {"damping": step.damping}
            if name in reasons:
                self.note_route(step, name, f"all-gather: {reasons[name]}")
        return True

    def note_route(self, step: StepData, name: str, route: str) -> None:
        """Record a sharded layer's route in its stats; log it when it changes."""
        step.stats[name]["sharded"] = route
        if self.notes.get(name) != route:
            self.notes[name] = route
            chosen = route.startswith("owner") or "sharded_grads='all-gather'" in route or not self.dist.active
            log = logger.info if chosen else logger.warning
            log("%s: layer %r: sharded gradient by %s", type(self.host).__name__, name, route)

    def solves_here(self, name: str) -> bool:
        if name in self.owner_routed:
            return self.dist.owns(name)
        return not self.host.owner_only(name) or self.dist.owns(name)

    def check(self, step: StepData, name: str, x: Tensor | None) -> Tensor | None:
        if x is not None and not torch.isfinite(x).all():
            step.stats[name]["fallback"] = "non-finite direction"
            x = None
        return x

    def share(self, step: StepData) -> None:
        """Broadcast owner-computed directions; a flag carries "keep the plain gradient"."""
        if not self.dist.active:
            return
        items, buffers = [], {}
        for name, (_, grad) in step.active.items():
            if not self.host.owner_only(name) or name in self.owner_routed:
                continue
            buf = grad.new_zeros(grad.numel() + 1)
            x = step.directions.get(name)
            if x is not None:
                buf[:-1] = x.reshape(-1)
                buf[-1] = 1
            buffers[name] = buf
            items.append((self.dist.owner(name), [buf]))
        self.dist.broadcast_from_owners(items)
        for name, buf in buffers.items():
            grad = step.active[name][1]
            step.directions[name] = buf[:-1].reshape(grad.shape) if buf[-1] == 1 else None

    def holds(self, name: str) -> bool:
        return name not in self.owner_routed or self.dist.owns(name)

    def product(self, x: Tensor | None, grad: Tensor) -> float:
        """``⟨X, ∇W⟩`` for the KL clip (0 without one, or without a direction)."""
        return 0.0 if not self.host.clipping.enabled or x is None else float((x * grad).sum())

    def scatter(self, step: StepData) -> None:
        for name in self.host.layers:
            x = step.directions.get(name)
            if x is not None:
                step.final[name] = (x, self.product(x, step.active[name][1]))


class ShardedAllGather(WholeLayerOwners):
    """FSDP2 by all-gathers (``sharded_grads="all-gather"``): as data parallel, each rank writing its rows."""

    name = "sharded all-gather"

    def sharded_route(self, parts: list[tuple[Tensor, slice | None]]) -> tuple[int, Any]:
        return _WHOLE, "sharded_grads='all-gather'"


class ShardedOwners(WholeLayerOwners):
    """FSDP2's owner scheme (:class:`cgfac.distributed.sharded.OwnerExchange`) wherever a layer's gradients allow it."""

    name = "sharded owners"

    def sharded_route(self, parts: list[tuple[Tensor, slice | None]]) -> tuple[int, Any]:
        layouts = []
        for k, (p, _) in enumerate(parts):
            layout = sharded.row_layout(cast(Tensor, p.grad), self.dist.group_ranks, self.dist.rank)
            if isinstance(layout, str):
                return _WHOLE, f"{'weight' if k == 0 else f'parameter {k}'} gradient {layout}"
            layouts.append(layout)
        return _OWNER, layouts

    def agree(self, step: StepData) -> bool:
        self.exchange: sharded.OwnerExchange | None = None
        self.scattered: dict[str, tuple[list[Tensor] | None, float]] = {}
        return super().agree(step)

    def gather(self, step: StepData) -> None:
        if not self.layouts:
            return
        host, dtype = self.host, self.host.compute_dtype
        self.exchange = sharded.OwnerExchange(
            self.dist, [(name, host.layers[name], self.dist.owner(name), self.layouts[name]) for name in self.layouts],
            {name: dtype(host.layers[name]) for name in self.layouts})
        for name, grad in self.exchange.gather().items():
            helper = step.active[name][0]
            step.active[name] = (helper, grad.to(dtype(helper)))
        for name in self.layouts:
            self.note_route(step, name, f"owner: rank {self.dist.owner(name)} gathers the rows, scatters the direction")

    def scatter(self, step: StepData) -> None:
        dirs, active = step.directions, step.active
        if self.exchange is not None:
            self.scattered = self.exchange.scatter({name: (dirs[name], self.product(dirs[name], active[name][1]))
                                                    for name in self.layouts if name in dirs})
        for name in self.host.layers:  # every rank: the layers that take a direction, in layer order
            if name in self.scattered:
                if self.scattered[name][0] is not None:
                    step.final[name] = self.scattered[name]
            elif dirs.get(name) is not None:
                step.final[name] = (dirs[name], self.product(dirs[name], active[name][1]))

    def write(self, step: StepData) -> None:
        for name, (x, _) in step.final.items():
            if name in self.scattered:
                cast(sharded.OwnerExchange, self.exchange).write(name, cast(list[Tensor], x), step.scale)
            else:
                self.host.layers[name].set_grad(cast(Tensor, x).mul_(step.scale))

