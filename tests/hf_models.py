"""Tiny, randomly initialised Hugging Face models (nothing downloaded) and synthetic token data."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import cgfac

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB, CONTEXT = 256, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a loaded machine's oversubscribed eigh can take
    seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """GPT-2 (tied embedding and head, ``Conv1D`` projections) or Llama (``LlamaRMSNorm``), 2
    layers of width 64, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=CONTEXT,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    return model.to(dtype)


def token_batches(count: int, batch: int, *, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch`` sequences of a learnable synthetic language (each token
    mostly follows from the previous one), as ``{"input_ids", "labels"}``."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, VOCAB, (VOCAB,), generator=gen)
    out = []
    for _ in range(count):
        ids = torch.empty(batch, CONTEXT, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
        for t in range(1, CONTEXT):
            noise = torch.randint(0, VOCAB, (batch,), generator=gen)
            keep = torch.rand(batch, generator=gen) < 0.9
            ids[:, t] = torch.where(keep, table[ids[:, t - 1]], noise)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


# The integration tests' shared set-up (tests/integrations): micro-batches, their stream, the preconditioner.
STEPS, MICRO, ACCUM = 3, 2, 2  # optimizer steps, sequences per micro-batch, micro-batches per step


def micro_batches() -> list[dict[str, torch.Tensor]]:
    return token_batches(STEPS * ACCUM, MICRO)


class Stream(torch.utils.data.IterableDataset):
    """The micro-batches' sequences in order (no sampler: the Trainer sees the plain loop's order)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            for i in range(b["input_ids"].shape[0]):
                yield {k: v[i] for k, v in b.items()}


def preconditioner(model: nn.Module) -> cgfac.KFAC:
    return cgfac.KFAC(model, damping=1e-2, lr=3e-3, kl_clip=1e-2, inv_update_steps=2)


def coverage(pre: cgfac.KFAC, model: nn.Module) -> float:
    covered = {id(p) for h in pre.layers.values() for p in h.params()}
    params = list(model.parameters())
    return sum(p.numel() for p in params if id(p) in covered) / sum(p.numel() for p in params)
