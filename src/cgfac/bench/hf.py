"""The ``gpt2`` benchmark task: a Hugging Face GPT-2 (tied embeddings, ``Conv1D`` projections)
on the standard library's text, and Muon as a peer (issue 17's evidence).

* :func:`gpt2_lm`: ``GPT2LMHeadModel`` randomly initialised (nothing is downloaded), byte
  vocabulary 256, context 128, width 320, 6 layers of 5 heads, dropout off: 7.5 M parameters, the
  output head tied to the token embedding. Wrapped so that ``model(x)`` returns the logits
  ``(batch, 128, 256)`` like the library's own ``transformer`` task, whose data, loss and
  evaluation (:func:`cgfac.data.load_stdlib_text`, held-out bits per byte) it shares.
  The run is the harness's own loop (forward, backward, ``pre.step()``, ``opt.step()``), which is
  exactly what ``transformers.Trainer`` does with ``PreconditionerCallback`` (tested against each
  other in ``tests/test_integrations.py``), without ``Trainer``'s logging in the timed steps.
* :func:`muon_adamw`: ``torch.optim.Muon`` on the hidden 2-D matrices (the blocks' projections)
  and AdamW on the rest (embeddings and the tied head, biases, LayerNorms), Muon's usual split.
  The learning rate of the grid is Muon's; the AdamW part runs at :data:`MUON_ADAMW_LR`.

``transformers`` is imported only when the model is built (the ``hf`` extra).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

GPT2_SIZE: dict[str, int] = {"n_embd": 320, "n_layer": 6, "n_head": 5}  # tests shrink it
VOCAB, CONTEXT = 256, 128
MUON_ADAMW_LR = 3e-3  # the AdamW part of muon_adamw: AdamW's tuned rate on the transformer task
MUON_WEIGHT_DECAY = 0.01  # as the harness's AdamW (torch's Muon default is 0.1)


class GPT2LM(nn.Module):
    """``GPT2LMHeadModel`` returning its logits for int64 byte tokens ``(batch, t)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x).logits


def gpt2_lm(**size: int) -> GPT2LM:
    """The ``gpt2`` task's model (:data:`GPT2_SIZE`, overridable by keyword)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise RuntimeError("the gpt2 task needs transformers: pip install 'cgfac[hf]'") from None
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True, **{**GPT2_SIZE, **size})
    return GPT2LM(GPT2LMHeadModel(config))


class Combined:
    """Several optimizers stepped as one (``zero_grad``, ``step``, ``param_groups``, ``state_dict``)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise ValueError("closure: the combined optimizer steps after an ordinary backward")
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(s)


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden 2-D matrices, the rest)``: every trainable 2-D parameter except embeddings'
    (which a tied output head shares), the rest being embeddings, biases and norms."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (hidden if p.dim() == 2 and id(p) not in embedded else rest).append(p)
    return hidden, rest


def muon_adamw(model: nn.Module, lr: float) -> Combined:
    """``torch.optim.Muon(lr)`` on the hidden matrices and ``AdamW(MUON_ADAMW_LR)`` on the rest."""
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise RuntimeError(f"muon needs torch.optim.Muon (torch >= 2.9), this is torch {torch.__version__}")
    hidden, rest = hidden_matrices(model)
    parts: list[torch.optim.Optimizer] = [muon_class(hidden, lr=lr, weight_decay=MUON_WEIGHT_DECAY)]
    if rest:
        parts.append(torch.optim.AdamW(rest, lr=MUON_ADAMW_LR, weight_decay=MUON_WEIGHT_DECAY))
    return Combined(parts)
