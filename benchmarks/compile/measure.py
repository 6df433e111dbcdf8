"""One measurement of a K-FAC training step (forward, backward, ``pre.step()``, AdamW) on a tiny
random GPT-2 (2 layers, width 64, vocabulary 256, context 128, batch 8, float32), eager and
``torch.compile``d (inductor), median of 20 steps after 5 warm-up steps (compilation excluded).

    python benchmarks/compile/measure.py [threads]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import cgfac


def steps(compiled: bool, n: int = 25, warmup: int = 5) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    run = torch.compile(model) if compiled else model
    pre = cgfac.KFAC(run, lr=1e-3, kl_clip=None, graft="rmsprop", inv_update_steps=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    times, first = [], 0.0
    for k in range(n):
        ids = torch.randint(0, 256, (8, 128), generator=gen)
        t = time.perf_counter()
        opt.zero_grad()
        run(input_ids=ids, labels=ids).loss.backward()
        pre.step()
        opt.step()
        dt = time.perf_counter() - t
        if k == 0:
            first = dt
        if k >= warmup:
            times.append(dt)
    return statistics.median(times), first, {n: s.get("method") for n, s in pre.layer_stats().items()}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    eager, _, _ = steps(False)
    compiled, first, _ = steps(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"eager:    {eager * 1e3:.1f} ms/step (median of 20)")
    print(f"compiled: {compiled * 1e3:.1f} ms/step (median of 20); first step incl. compilation {first:.1f} s")
