"""Tiny, randomly initialised Hugging Face models (nothing downloaded) and synthetic token data."""

from __future__ import annotations

import os

import pytest
import torch

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
