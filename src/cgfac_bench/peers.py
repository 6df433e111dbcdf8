"""Peers built from several torch optimizers: Muon on the hidden matrices, AdamW on the rest.

``torch.optim.Muon`` orthogonalises each update of a 2-D matrix (Newton–Schulz); its authors
prescribe it for the hidden matrices only, with AdamW on embeddings, the output head, biases and
normalisation gains. :func:`hidden_matrices` makes that split, :func:`muon_with_adamw` the pair,
:class:`CombinedOptimizer` steps them as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ADAMW_WEIGHT_DECAY = 0.01
MUON_ADAMW_LR = 1e-3  # adjust_lr_fn="original": AdamW's lr on the non-hidden parameters


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one: ``param_groups`` and ``state`` are theirs, so
    schedulers and ``state_dict`` see every group."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.defaults = {}
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = {}  # type: ignore[assignment]
        for o in self.optimizers:
            self.state.update(o.state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: every trainable 2-D weight (``nn.Linear``, Hugging Face ``Conv1D``, ...)
    but embeddings' (and an output head tied to one) and the output layer's (the last module with
    a 2-D weight); the rest are every other trainable parameter, each once."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = [w for m in model.modules() if isinstance(w := getattr(m, "weight", None), nn.Parameter)
                and w.dim() == 2]
    head = id(matrices[-1]) if matrices else None
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (hidden if p.dim() == 2 and id(p) not in embedded and id(p) != head else rest).append(p)
    return hidden, rest


def muon_with_adamw(model: nn.Module, lr: float, adjust_lr_fn: str = "match_rms_adamw",
                    adamw_lr: float | None = None) -> CombinedOptimizer:
    """``torch.optim.Muon`` (weight decay 0, its other defaults) on :func:`hidden_matrices`, AdamW
    (weight decay :data:`ADAMW_WEIGHT_DECAY`) on the rest. ``adjust_lr_fn="match_rms_adamw"``
    scales Muon's update to AdamW's RMS, so one ``lr`` serves both; ``"original"`` (Muon's own
    scaling, lr about 0.02) keeps AdamW at ``adamw_lr`` (default :data:`MUON_ADAMW_LR`)."""
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise RuntimeError(f"muon needs torch.optim.Muon (torch >= 2.9), this is torch {torch.__version__}")
    hidden, rest = hidden_matrices(model)
    parts: list[torch.optim.Optimizer] = [muon_class(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn=adjust_lr_fn)]
    if rest:
        part_lr = lr if adjust_lr_fn == "match_rms_adamw" else (MUON_ADAMW_LR if adamw_lr is None else adamw_lr)
        parts.append(torch.optim.AdamW(rest, lr=part_lr, weight_decay=ADAMW_WEIGHT_DECAY))
    return CombinedOptimizer(parts)
