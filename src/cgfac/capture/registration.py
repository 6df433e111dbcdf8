"""Registration: which modules of a model a preconditioner covers, by which helper, and why not.

:func:`register` walks the (unwrapped) model once: every module with trainable parameters of its
own gets its helper (one or more units, each a block solved on its own), joins a tied block
(:mod:`cgfac.layers.tied`), or keeps its plain gradient with the reason in a :class:`ReportEntry`.
The helpers' hooks report to a :class:`cgfac.layers.Capture` (:class:`cgfac.capture.capture.Recorder`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from torch import nn
from torch.utils.hooks import RemovableHandle

from cgfac.layers import Capture, LayerHelper, TiedHelper, make_helper, tie_reason
from cgfac.layers.registry import HelperFactory

__all__ = ["Registration", "ReportEntry", "annotate", "log_report", "register", "unwrap"]

logger = logging.getLogger("cgfac")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (any nesting).

    A compiled model works: the hooks sit on the original modules, which the compiled forward
    traces (TorchDynamo inlines module forward hooks; the tensor hooks on layer outputs run in
    the backward), so the rows and directions are the eager ones (tested with the ``aot_eager``
    and ``inductor`` backends)."""
    for _ in range(8):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            break
    return model


@dataclass(frozen=True)
class ReportEntry:
    """One trainable module: whether it is preconditioned, and if not, why."""

    name: str
    module_type: str
    covered: bool
    reason: str
    rule: str = ""  # which rule covered it: "registered:<class>", "layer_helpers[<class>]", "probe:<kind>", "tied"
    memory: str = ""  # its blocks' planned state: form, bytes and rule (cgfac.precondition.memory)

    def __str__(self) -> str:
        status = "preconditioned" if self.covered else "plain gradient"
        rule = f" [{self.rule}]" if self.rule else ""
        memory = f"; state: {self.memory}" if self.memory else ""
        return f"{self.name or '<root>'} ({self.module_type}): {status}{rule}: {self.reason}{memory}"


@dataclass
class Registration:
    """What :func:`register` found: the blocks by name (layer order), the report, the hooks."""

    layers: dict[str, LayerHelper] = field(default_factory=dict)
    report: list[ReportEntry] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    blocks: dict[str, list[str]] = field(default_factory=dict)  # covered report entry -> the blocks of its module


def skipped(name: str, module: nn.Module, skip_layers: Sequence[str | type]) -> bool:
    """Whether ``skip_layers`` (module names or regular expressions, class names, classes) names the module."""
    for s in skip_layers:
        if isinstance(s, type) and isinstance(module, s):
            return True
        if isinstance(s, str) and (s == name or s == type(module).__name__ or re.fullmatch(s, name)):
            return True
    return False


def register(model: nn.Module, capture: Capture, *, skip_layers: Sequence[str | type],
             layer_helpers: Mapping[type, HelperFactory], probe: bool) -> Registration:
    """Every module with trainable parameters of its own: its helper (attached to ``capture``), or
    the reason it keeps its plain gradient. Layers are named as in the unwrapped model, so names
    (and checkpoints) are the same with and without DistributedDataParallel (on any number of
    processes) and torch.compile."""
    out = Registration()
    claimed: dict[int, tuple[str, bool]] = {}  # child module id -> (parent name, parent covered)
    entries: list[tuple[str, nn.Module, Any]] = []
    skipped_params: dict[int, str] = {}  # parameter id -> the skipped module using it
    for name, module in unwrap(model).named_modules():
        kind = type(module).__name__
        if id(module) in claimed:
            parent, ok = claimed[id(module)]
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                reason = f"covered by {parent!r}" if ok else f"part of {parent!r}, which is not preconditioned"
                out.report.append(ReportEntry(name, kind, ok, reason))
            continue
        helper = make_helper(name, module, layer_helpers, probe=probe)
        if helper is None:
            continue
        if isinstance(helper, str):
            out.report.append(ReportEntry(name, kind, False, helper))
            continue
        skip = skipped(name, module, skip_layers)
        for child in helper.claims():
            claimed[id(child)] = (name, not skip)
        if skip:
            out.report.append(ReportEntry(name, kind, False, "in skip_layers"))
            skipped_params.update({id(p): name for unit in helper.units() for p in unit.params()})
            continue
        entries.append((name, module, helper))
    with_skipped = _sharing_skipped(entries, skipped_params)
    tied, uncovered = tie([e for e in entries if e[0] not in with_skipped])
    for name, skipped_name in with_skipped.items():
        uncovered[name] = (f"shares a Parameter with {skipped_name!r}, which is in skip_layers (or shares one "
                           "with it): plain gradient")
    for name, module, helper in entries:
        kind = type(module).__name__
        if name in uncovered:
            out.report.append(ReportEntry(name, kind, False, uncovered[name]))
            continue
        if name in tied:
            block = tied[name]
            if block is None:  # a later use of a tied block: registered with its first use
                continue
            for use in block.uses:
                use_kind = type(use.helper.module).__name__
                others = ", ".join(repr(u.name) for u in block.uses if u.name != use.name)
                out.report.append(ReportEntry(
                    use.name, use_kind, True, f"shares its weight with {others}: {block.describe()}",
                    f"tied ({use.helper.rule or 'registered'})"))
                out.blocks[use.name] = [block.name]
            out.layers[block.name] = block
            out.handles += block.attach(capture)
            continue
        for unit in helper.units():
            out.layers[unit.name] = unit
        out.report.append(ReportEntry(name, kind, True, helper.describe(), helper.rule))
        out.blocks[name] = [unit.name for unit in helper.units()]
        out.handles += helper.attach(capture)
    _experts_lists(out, unwrap(model), capture)
    return _shared_with_covered(out, unwrap(model))


def _experts_lists(out: Registration, model: nn.Module, capture: Capture) -> None:
    """Mixture-of-experts layers of older transformers (an ``experts`` ``nn.ModuleList`` of MLPs): each
    expert's layers see only their routed tokens, so their blocks are the per-expert Fisher over the
    ``N`` tokens of the call (:mod:`cgfac.layers.experts`), ``N`` read by hooks on the module holding
    the list."""
    units = {id(u.module): u for helper in out.layers.values() for u in helper.units()}
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList):
            continue
        inside = [units[id(m)] for m in experts.modules() if id(m) in units]
        if not inside:
            continue
        for unit in inside:
            unit.in_experts = True
        enter, leave = getattr(capture, "enter_experts", None), getattr(capture, "leave_experts", None)
        if enter is None or leave is None:
            continue
        out.handles += [module.register_forward_pre_hook(enter, with_kwargs=True),
                        module.register_forward_hook(leave, with_kwargs=True, always_call=True)]


def _shared_with_covered(out: Registration, model: nn.Module) -> Registration:
    """An uncovered module whose trainable parameters are all another covered block's (BERT's MLM head
    holds the bias its decoder uses) is reported as covered there."""
    owner = {id(p): block for block, helper in out.layers.items() for unit in helper.units() for p in unit.params()}
    modules = dict(model.named_modules())
    for i, entry in enumerate(out.report):
        module = modules.get(entry.name)
        if entry.covered or module is None or entry.reason == "in skip_layers":
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and all(id(p) in owner for p in own):
            blocks = ", ".join(sorted({repr(owner[id(p)]) for p in own}))
            out.report[i] = replace(entry, covered=True, reason=f"its parameters are shared with block {blocks}, "
                                    "which covers them", rule="shared")
    return out


def _sharing_skipped(entries: list[tuple[str, nn.Module, Any]], skipped_params: dict[int, str]) -> dict[str, str]:
    """The entries sharing a Parameter with a skipped module (directly, or through other modules),
    with that module's name: their .grad holds the skipped module's share, which no block can own."""
    with_skipped: dict[str, str] = {}
    changed = bool(skipped_params)
    while changed:
        changed = False
        for name, _, helper in entries:
            ids = {id(p) for unit in helper.units() for p in unit.params()}
            hit = next((skipped_params[i] for i in ids if i in skipped_params), None)
            if hit is not None and name not in with_skipped:
                with_skipped[name] = hit
                skipped_params.update({i: hit for i in ids})
                changed = True
    return with_skipped


def tie(entries: list[tuple[str, nn.Module, Any]]) -> tuple[dict[str, TiedHelper | None], dict[str, str]]:
    """Modules whose parameters another covered module also uses (a tied embedding and output
    layer, any weight shared between layers): ``{first use: TiedHelper, later use: None}`` for
    the groups that form one block (:mod:`cgfac.layers.tied`), and the reason of the others
    (two layer matrices of one Parameter cannot both replace its gradient)."""
    owner: dict[int, int] = {}  # parameter id -> group (union of entries sharing parameters)
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (_, _, helper) in enumerate(entries):
        for p in {id(p): p for unit in helper.units() for p in unit.params()}:
            if p in owner:
                parent[find(i)] = find(owner[p])
            else:
                owner[p] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(entries)):
        groups.setdefault(find(i), []).append(i)
    tied: dict[str, TiedHelper | None] = {}
    uncovered: dict[str, str] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        names = [entries[i][0] for i in members]
        helpers = [entries[i][2] for i in members]
        single = all(isinstance(h, LayerHelper) and h.units() == [h] for h in helpers)
        reason = tie_reason(helpers) if single else "a module with several blocks shares a Parameter"
        if reason is None:
            block = TiedHelper("+".join(names), list(zip(names, helpers)))
            tied[names[0]] = block
            tied.update({n: None for n in names[1:]})
            continue
        for n in names:
            others = ", ".join(repr(o) for o in names if o != n)
            uncovered[n] = (f"shares a Parameter with {others}, which cannot be one block ({reason}): "
                            "plain gradient")
    return tied, uncovered


def annotate(report: list[ReportEntry], blocks: Mapping[str, list[str]],
             memory: Mapping[str, Any]) -> list[ReportEntry]:
    """The report with each covered entry's ``memory`` set from its blocks' plans (``str(plan)``;
    several blocks of one module are named)."""
    out = []
    for entry in report:
        names = [b for b in blocks.get(entry.name, []) if b in memory] if entry.covered else []
        if names:
            text = str(memory[names[0]]) if len(names) == 1 else "; ".join(f"{b}: {memory[b]}" for b in names)
            entry = replace(entry, memory=text)
        out.append(entry)
    return out


def log_report(owner: str, report: list[ReportEntry]) -> None:
    """Log the registration (info) and the modules that keep their plain gradient (a warning)."""
    logger.info("%s registration:\n  %s", owner, "\n  ".join(map(str, report)))
    plain = [e for e in report if not e.covered]
    if plain:
        logger.warning("%s: %d trainable module(s) keep their plain gradient: %s", owner, len(plain),
                       "; ".join(map(str, plain)))
