"""The memory budget: every block's state sized at registration, before anything is allocated.

A preconditioner's per-block state is sized from shapes and settings alone (:func:`kfac_block_bytes`,
:func:`cgfac_block_bytes`), with ``B`` bytes per number of the compute dtype, for a block with a
``d_out × d_in`` layer matrix:

* K-FAC (:class:`cgfac.KFAC`), a Kronecker block: per side of width ``d``, a dense factor costs
  ``3d² + d`` numbers (the running factor, a batch's factor while it is folded in, the
  eigenbasis; the eigenvalues), a diagonal one ``3d``; an embedding (diagonal input factor) is
  ``3 d_in + 3 d_out² + d_out``, a normalisation layer's feature blocks ``3 d_out d_in²``.
* CG-FAC (:class:`cgfac.CGFAC`): the warm start ``d_out d_in`` (solvers that use CG), and with
  ``solver="eigen"`` the explicit factors and their eigenbases ``2(d_in² + d_out²) + d_in + d_out``;
  the rows, ``(d_in + d_out)`` numbers per row and batch of the window, depend on the batch and are
  named per row.
* ``graft="rmsprop"`` adds the second moment, ``d_out d_in``, to every block.

Not counted: the gradient, the rows of one step (both the size of the backward pass's own
tensors) and the eigendecomposition's transient workspace (about ``2d²`` for one side at a time).

**The budget** (``memory_budget=``): None (default) is :data:`DEFAULT_BUDGET_FRACTION` of the
device's memory (CPU: total RAM, ``os.sysconf``; CUDA: ``get_device_properties().total_memory``),
and at most :data:`DEFAULT_PARAMETER_MULTIPLE` times the model's trainable parameters' bytes (three
times AdamW's state) but never below :data:`DEFAULT_BUDGET_FLOOR`: a preconditioner's state then
stays in proportion to the model (GPT-2 small: 3.0 GB, peak 1.9× AdamW's against 2.25× with a
quarter of 24 GB), while a small model keeps every dense factor; a number ``≤ 1`` is a fraction of the
device's memory; a number ``> 1`` bytes; ``math.inf`` no budget.

**The rule** (K-FAC, :func:`plan_kfac`): if the blocks' total exceeds the budget, the block whose
next cheaper form saves the most bytes, among those left to the rule (``factor_form="auto"``),
takes it, and so on until the total fits: ``"dense"`` → the larger side (by width; the output side on
a tie) kept as its diagonal (``"diag-out"`` or ``"diag-in"``, the factor ``diag(Σ_rows g²)/n``, its
eigenbasis the identity) → ``"diag"`` (both sides diagonal). With a diagonal output side the
system ``G X A + λX = ∇W`` separates by rows: row ``i`` of ``X`` is
``∇W_i Q_A diag(1/(g_i s_A + λ)) Q_Aᵀ``. A block forced ``"dense"`` (``factor_form``) whose state
does not fit (the total over the budget once every other block is as cheap as it gets) raises
``ValueError`` naming the layer and the bytes; a total that still exceeds the budget otherwise is a
warning. The registration report names each block's form, the rule and the bytes.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cgfac.config import FactorForm, values

__all__ = ["DEFAULT_BUDGET_FLOOR", "DEFAULT_BUDGET_FRACTION", "DEFAULT_PARAMETER_MULTIPLE", "FORMS", "Block",
           "BlockMemory", "Budget", "cgfac_block_bytes",
           "device_memory", "format_bytes", "kfac_block_bytes", "plan_cgfac", "plan_kfac", "resolve_budget",
           "resolve_forms"]

DEFAULT_BUDGET_FRACTION = 0.25  # of the device's memory: the model, activations and optimizer need the rest
DEFAULT_PARAMETER_MULTIPLE = 6  # × the trainable parameters' bytes (3× AdamW's two moments) ...
DEFAULT_BUDGET_FLOOR = 1e9  # ... but never below 1 GB (bytes)
FORMS = values(FactorForm)  # K-FAC's forms of a Kronecker block, densest first


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps it ≥ 1 (decimal: kB, MB, GB, TB)."""
    if n == math.inf:
        return "unlimited"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """The total memory of ``device`` in bytes, and where it was read; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), f"{device} total memory"
    if device.type != "cpu":
        return None, f"{device.type} (memory unknown)"
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES")), "total RAM"
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().total), "total RAM (psutil)"
    except ImportError:
        return None, "total RAM unknown"


@dataclass(frozen=True)
class Budget:
    """A resolved budget: ``bytes`` (``math.inf``: none) and how it was set."""

    bytes: float
    source: str

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def resolve_budget(memory_budget: float | None, device: torch.device, parameter_bytes: int | None = None) -> Budget:
    """The budget in bytes for ``memory_budget`` (see the module docstring) on ``device``; with
    ``memory_budget=None`` and the model's ``parameter_bytes`` given, the default is also held to
    ``max(DEFAULT_BUDGET_FLOOR, DEFAULT_PARAMETER_MULTIPLE · parameter_bytes)``."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))):
        raise TypeError(f"memory_budget must be None, a fraction (<= 1) or bytes (> 1), got {memory_budget!r}")
    if memory_budget is not None and not memory_budget > 0:
        raise ValueError(f"memory_budget must be > 0 (a fraction <= 1 or bytes > 1), got {memory_budget!r}")
    if memory_budget is not None and memory_budget > 1:
        return Budget(float(memory_budget), "memory_budget" if memory_budget < math.inf else "no budget")
    fraction = DEFAULT_BUDGET_FRACTION if memory_budget is None else float(memory_budget)
    total, where = device_memory(device)
    device_budget = Budget(math.inf, f"no budget: {where}") if total is None else \
        Budget(fraction * total, f"{fraction:.0%} of {format_bytes(total)}, {where}")
    if memory_budget is None and parameter_bytes is not None:
        cap = max(DEFAULT_BUDGET_FLOOR, DEFAULT_PARAMETER_MULTIPLE * parameter_bytes)
        if cap < device_budget.bytes:
            return Budget(cap, f"{DEFAULT_PARAMETER_MULTIPLE}× the parameters' {format_bytes(parameter_bytes)}, "
                               f"at least {format_bytes(DEFAULT_BUDGET_FLOOR)}; under {device_budget}")
    return device_budget


@dataclass(frozen=True)
class Block:
    """What sizing a block needs: its structure (``LayerHelper.structure``), widths and bytes per number."""

    structure: str
    d_in: int
    d_out: int
    number_bytes: int


def kfac_block_bytes(block: Block, form: str = "dense", *, graft: bool = False) -> int:
    """K-FAC's state of one block in ``form`` (see the module docstring), in bytes."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    d_in, d_out = block.d_in, block.d_out
    if block.structure == "diag-kron":
        numbers = 3 * d_in + 3 * d_out * d_out + d_out
    elif block.structure == "feature-blocks":
        numbers = 3 * d_out * d_in * d_in
    else:
        diag_in, diag_out = form in ("diag-in", "diag"), form in ("diag-out", "diag")
        numbers = (3 * d_in if diag_in else 3 * d_in * d_in + d_in) + (3 * d_out if diag_out else 3 * d_out * d_out
                                                                        + d_out)
    if graft:
        numbers += d_in * d_out
    return numbers * block.number_bytes


def cgfac_block_bytes(block: Block, *, solver: str, graft: bool = False) -> tuple[int, int]:
    """CG-FAC's state of one block: ``(bytes without the rows, bytes per curvature row)``."""
    d_in, d_out = block.d_in, block.d_out
    numbers = d_in * d_out if solver in ("auto", "cg") else 0  # the warm start
    if solver == "eigen" and block.structure == "kron":
        numbers += 2 * (d_in * d_in + d_out * d_out) + d_in + d_out
    if graft:
        numbers += d_in * d_out
    return numbers * block.number_bytes, (d_in + d_out) * block.number_bytes


@dataclass(frozen=True)
class BlockMemory:
    """One block's planned state: its form, its bytes (``dense_bytes``: in the dense form) and the rule."""

    name: str
    form: str
    bytes: int
    dense_bytes: int
    rule: str

    def __str__(self) -> str:
        return f"{self.form}, {format_bytes(self.bytes)} ({self.rule})"


def resolve_forms(names: list[str], factor_form: str | Mapping[str, str]) -> dict[str, str]:
    """Each block's requested form: ``factor_form`` for all, or ``{name or regex: form}`` with
    ``"auto"`` for blocks not named. Forms: ``"auto"`` or one of :data:`FORMS`."""
    allowed = ("auto", *FORMS)
    if isinstance(factor_form, str):
        if factor_form not in allowed:
            raise ValueError(f"factor_form must be one of {allowed} or a mapping, got {factor_form!r}")
        return dict.fromkeys(names, factor_form)
    if not isinstance(factor_form, Mapping):
        raise TypeError(f"factor_form must be a str or a mapping, got {type(factor_form).__name__}")
    out = dict.fromkeys(names, "auto")
    for key, form in factor_form.items():
        if form not in allowed:
            raise ValueError(f"factor_form[{key!r}] must be one of {allowed}, got {form!r}")
        hits = [n for n in names if n == key or re.fullmatch(key, n)]
        if not hits:
            raise ValueError(f"factor_form: {key!r} names no block (blocks: {names})")
        out.update(dict.fromkeys(hits, form))
    return out


def _cheaper(block: Block, form: str) -> str | None:
    """The next cheaper form of a Kronecker block (see the rule), or None."""
    if block.structure != "kron" or form == "diag":
        return None
    if form == "dense":
        return "diag-out" if block.d_out >= block.d_in else "diag-in"
    return "diag"


def plan_kfac(blocks: Mapping[str, Block], budget: Budget, requested: Mapping[str, str], *,
              graft: bool = False) -> dict[str, BlockMemory]:
    """Each block's K-FAC form by the rule of the module docstring, with its bytes.

    Raises ``ValueError`` when a block forced ``"dense"`` does not fit, or a diagonal form is
    forced on a block that is not a Kronecker block."""
    form: dict[str, str] = {}
    for name, block in blocks.items():
        want = requested.get(name, "auto")
        if want not in ("auto", "dense") and block.structure != "kron":
            raise ValueError(f"factor_form: layer {name!r} is a {block.structure!r} block, not a Kronecker one: "
                             f"only 'auto' or 'dense'")
        form[name] = "dense" if want == "auto" else want
    size = {n: kfac_block_bytes(b, form[n], graft=graft) for n, b in blocks.items()}
    dense = {n: kfac_block_bytes(b, "dense", graft=graft) for n, b in blocks.items()}
    total = sum(size.values())
    auto = [n for n in blocks if requested.get(n, "auto") == "auto"]
    while total > budget.bytes:
        open_ = [n for n in auto if _cheaper(blocks[n], form[n]) is not None]
        if not open_:
            break
        cheaper = {n: kfac_block_bytes(blocks[n], _cheaper(blocks[n], form[n]) or form[n], graft=graft) for n in open_}
        name = max(open_, key=lambda n: size[n] - cheaper[n])  # the largest saving; the first of equals
        form[name] = _cheaper(blocks[name], form[name]) or form[name]
        new = cheaper[name]
        total += new - size[name]
        size[name] = new
    fits = total <= budget.bytes
    if not fits:
        forced = [n for n in blocks if requested.get(n, "auto") == "dense"]
        if forced:
            name = max(forced, key=lambda n: size[n])
            raise ValueError(
                f"factor_form: layer {name!r} is forced 'dense': its K-FAC state needs {format_bytes(size[name])} "
                f"({size[name]} bytes) and the blocks' total {format_bytes(total)} ({total} bytes) with every other "
                f"block as cheap as it gets, over the memory budget of {budget}; leave it to 'auto', force a "
                "diagonal form or raise memory_budget")
        warnings.warn(f"cgfac: K-FAC's state needs {format_bytes(total)} with every block as cheap as it gets, over "
                      f"the memory budget of {budget}", RuntimeWarning, stacklevel=4)
    plan = {}
    for name in blocks:
        want = requested.get(name, "auto")
        if want != "auto":
            rule = f"factor_form={want!r}"
        elif form[name] == "dense":
            rule = "dense: the total fits the budget" if fits else "dense: no cheaper form"
        else:
            rule = (f"dense would need {format_bytes(dense[name])}: the widest sides go diagonal, largest saving "
                    "first, until the total fits the budget")
        plan[name] = BlockMemory(name, form[name], size[name], dense[name], f"{rule}; budget {budget}")
    return plan


def plan_cgfac(blocks: Mapping[str, Block], budget: Budget, *, solver: str, window: int,
               graft: bool = False) -> dict[str, BlockMemory]:
    """CG-FAC's state per block: rows (form ``"rows"``) or explicit factors (``solver="eigen"``).
    With ``solver="eigen"`` a total over the budget raises ``ValueError`` naming the largest block
    (the dense factors forced); otherwise the rows' low-rank solve needs no ``d × d`` factor."""
    plan = {}
    for name, block in blocks.items():
        fixed, per_row = cgfac_block_bytes(block, solver=solver, graft=graft)
        form = "factors" if solver == "eigen" and block.structure == "kron" else "rows"
        rule = (f"+ {format_bytes(per_row)} per curvature row, window {window}; budget {budget}")
        plan[name] = BlockMemory(name, form, fixed, fixed, rule)
    total = sum(m.bytes for m in plan.values())
    if solver == "eigen" and total > budget.bytes:
        name = max(plan, key=lambda n: plan[n].bytes)
        raise ValueError(f"solver='eigen': layer {name!r} needs {format_bytes(plan[name].bytes)} "
                         f"({plan[name].bytes} bytes) of explicit factors, and the blocks' total "
                         f"{format_bytes(total)} ({total} bytes) is over the memory budget of {budget}; "
                         "use solver='auto' or 'lowrank' (rows, no d x d factor) or raise memory_budget")
    return plan
