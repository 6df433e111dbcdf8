"""Checkpoints that load on any number of processes, written atomically.

Across processes a layer's curvature lives on its owner rank (CG-FAC's row windows and warm
starts; K-FAC mem-opt's decompositions), so one rank's :meth:`Preconditioner.state_dict` is only
part of the state. :func:`full_state_dict` (a collective: call it on every rank) gathers each
layer's state from its owner into one state, which :meth:`Preconditioner.load_state_dict` loads on
any number of processes: every rank takes the whole state and keeps its own layers once the next
step has assigned owners. The next step's directions are those of an uninterrupted run (the
directions on ``N`` ranks equal one process's on the global batch, and the curvature state is
the same). Only tensors and plain Python values: it loads with ``torch.load(weights_only=True)``.

:func:`save_atomic` writes a file under a temporary name in the same directory, flushes it to
disk, then renames it over the target: a process killed mid-save leaves the previous checkpoint
intact, never a truncated one. A training loop that saves ``{model, optimizer, preconditioner,
step}`` after each step this way and loads the latest file at start resumes exactly after a
restart (``torchrun --max-restarts``): the step counter comes from the same file as the
parameters, so no step is lost or applied twice.

::

    state = {"model": model.state_dict(), "opt": opt.state_dict(),
             "pre": cgfac.checkpoint.full_state_dict(pre), "step": step}   # every rank
    if rank == 0:
        cgfac.checkpoint.save_atomic(state, "ckpt.pt")
    ...
    saved = torch.load("ckpt.pt", weights_only=True)   # any number of processes
    pre.load_state_dict(saved["pre"])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cgfac.precondition.base import Preconditioner

__all__ = ["full_state_dict", "save_atomic"]


def _cpu(obj: Any) -> Any:
    """A copy of a state with every tensor on the CPU (what crosses processes and files)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def full_state_dict(pre: Preconditioner, *, dst: int | None = 0) -> dict[str, Any] | None:
    """The whole preconditioner state of every rank, loadable on any number of processes.

    A collective: every rank of the preconditioner's process group calls it. Each layer's state
    comes from its owner (the rank that holds it), the rest from rank 0; the true Fisher's random
    streams of every rank are kept (``rank_generators``), so a resume on the same number of
    processes continues them. Tensors are copied to the CPU.

    Args:
        pre: a :class:`cgfac.CGFAC` or :class:`cgfac.KFAC` (the preconditioner, not a
            ``cgfac.optim`` optimizer; use its ``.preconditioner``).
        dst: the rank (in the preconditioner's group) that receives the state; the others get
            None. ``None``: every rank receives it.

    With one process (or none initialised) this is ``pre.state_dict()`` on the CPU.
    """
    if not isinstance(pre, Preconditioner):
        raise TypeError(f"pre must be a cgfac Preconditioner (CGFAC or KFAC), got {type(pre).__name__}")
    world, rank = pre.dist.world, pre.dist.rank
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < world):
        raise ValueError(f"dst must be a rank in [0, {world}) or None, got {dst!r}")
    local = _cpu(pre.state_dict())
    if not pre.dist.active:
        return local
    # Send only what this rank is the source of: its own layers, and rank 0 everything global.
    mine = {name: entry for name, entry in local["layers"].items() if pre.dist.owner(name) == rank}
    part = {"layers": mine, "generators": local["generators"]}
    if rank == 0:
        part["top"] = {k: v for k, v in local.items() if k not in ("layers", "generators")}
    else:
        part["top"] = {k: v for k, v in local.items() if k not in ("layers", "generators") and v is not None
                       and k not in ("world_size", "rank", "full", "steps")}
    parts = pre.dist.gather_objects(part, dst)
    if parts is None:
        return None
    full = dict(parts[0]["top"])
    for p in parts[1:]:  # values rank 0 never measured (e.g. CG-FAC's cost constants on another owner)
        for k, v in p["top"].items():
            if full.get(k) is None:
                full[k] = v
    full.pop("rank", None)
    full["full"] = True
    full["world_size"] = world
    full["generators"] = parts[0]["generators"]
    full["rank_generators"] = [p["generators"] for p in parts]
    full["layers"] = {}
    for name in local["layers"]:
        owner = pre.dist.owner(name)
        if name not in parts[owner]["layers"]:
            raise RuntimeError(f"cgfac: rank {owner} did not send the state of its layer {name!r}")
        full["layers"][name] = parts[owner]["layers"][name]
    return full


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically: written to a temporary file in the same directory,
    flushed to disk (``fsync``), then renamed over ``path`` (``os.replace``; the directory is
    synced too). A crash at any point leaves either the previous file or the new one."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"path: {str(target)!r} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
