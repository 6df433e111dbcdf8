"""Hugging Face ``Trainer`` with a preconditioner: ``PreconditionerCallback`` (``pip install "cgfac[hf]"``).

A tiny GPT-2 built from its config (random weights, nothing downloaded) learns a toy language:
sequences counting upwards modulo the vocabulary. ``Trainer`` runs every micro-batch's forward and
backward, then its clipping (``max_grad_norm``, on the raw gradient), then ``pre.step()`` (the
callback's ``on_pre_optimizer_step``), then ``optimizer.step()``. Tied weights (GPT-2's
``lm_head.weight is transformer.wte.weight``) are one block, ``"transformer.wte+lm_head"``.

    HF_HUB_OFFLINE=1 python examples/hf_trainer.py [--tiny]
"""

import argparse
import os
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import cgfac
from cgfac.integrations.transformers import PreconditionerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model from its config: nothing to download
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="two layers of width 32, a few steps")
args = parser.parse_args()

torch.manual_seed(0)
width, steps = (32, 6) if args.tiny else (128, 200)
vocab, length = 64, 32
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=4, vocab_size=vocab, n_positions=length,
                                   bos_token_id=0, eos_token_id=0))
starts = torch.randint(0, vocab, (256, 1))
ids = (starts + torch.arange(length)) % vocab  # each token is the previous one plus one
data = [{"input_ids": s, "labels": s} for s in ids]

pre = cgfac.KFAC(model, damping=1e-3, kl_clip=None, graft="rmsprop", factor_update_steps=1, inv_update_steps=5)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
train_args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=16, gradient_accumulation_steps=2,
                               max_steps=steps, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                               save_strategy="no", disable_tqdm=True, logging_strategy="no")


def loss_on(batch: torch.Tensor) -> float:
    with torch.no_grad():
        return model(batch, labels=batch).loss.item()


before = loss_on(ids[:64])
Trainer(model=model, args=train_args, train_dataset=data, optimizers=(opt, None),
        callbacks=[PreconditionerCallback(pre)]).train()
print(f"preconditioner steps {pre.steps}; blocks: {sorted(pre.layer_stats())[:3]} ...")
print(f"loss {before:.4f} -> {loss_on(ids[:64]):.4f}")
