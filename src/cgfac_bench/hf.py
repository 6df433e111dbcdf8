"""The ``gpt2`` benchmark task: a Hugging Face GPT-2 (tied embeddings, ``Conv1D`` projections)
on the standard library's text, and Muon as a peer (issue 17's evidence).

* :func:`gpt2_lm`: ``GPT2LMHeadModel`` randomly initialised (nothing is downloaded), byte
  vocabulary 256, context 128, width 320, 6 layers of 5 heads, dropout off: 7.5 M parameters, the
  output head tied to the token embedding. Wrapped so that ``model(x)`` returns the logits
  ``(batch, 128, 256)`` like the library's own ``transformer`` task, whose data, loss and
  evaluation (:func:`cgfac_bench.data.load_stdlib_text`, held-out bits per byte) it shares.
  The run is the harness's own loop (forward, backward, ``pre.step()``, ``opt.step()``), which is
  exactly what ``transformers.Trainer`` does with ``PreconditionerCallback`` (tested against each
  other in ``tests/integrations/test_transformers.py``), without ``Trainer``'s logging in the timed steps.
* Muon (``muon``, ``muon-original``: :mod:`cgfac_bench.peers`) takes the hidden 2-D matrices (the
  blocks' ``Conv1D`` projections), AdamW the rest (embeddings and the tied head, biases, LayerNorms).

``transformers`` is imported only when the model is built (the ``hf`` extra).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

GPT2_SIZE: dict[str, int] = {"n_embd": 320, "n_layer": 6, "n_head": 5}  # tests shrink it
VOCAB, CONTEXT = 256, 128


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
    sizes: dict[str, Any] = {**GPT2_SIZE, **size}  # GPT2Config's keywords are of many types
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True, **sizes)
    return GPT2LM(GPT2LMHeadModel(config))
