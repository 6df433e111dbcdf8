"""The Hugging Face ``Trainer`` callback (:mod:`cgfac.integrations.transformers`) with the preconditioners
and ``cgfac.optim``, for real: tiny random GPT-2 and Llama (float64, CPU), a few steps with gradient
accumulation and clipping, against a plain loop of the same steps (same batches, same order); both
callbacks' argument checks."""

from __future__ import annotations

import pytest
import torch
from hf_models import (  # noqa: F401  (one_thread: an autouse fixture)
    ACCUM,
    MICRO,
    STEPS,
    VOCAB,
    Stream,
    coverage,
    micro_batches,
    one_thread,
    preconditioner,
    tiny_model,
)
from torch import nn

import cgfac

pytest.importorskip("transformers")

def record_items(model: nn.Module) -> list:
    """The ``num_items_in_batch`` Trainer passes each forward (its loss is summed over the
    micro-batch's labels and divided by the accumulated step's count); the plain loop uses the same."""
    items: list = []
    model.register_forward_pre_hook(lambda m, a, k: items.append(k.get("num_items_in_batch")), with_kwargs=True)
    return items


def plain_hf_loop(arch: str, clip: float, items: list):
    model = tiny_model(arch)
    pre = preconditioner(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches, losses = micro_batches(), []
    for s in range(STEPS):
        total = 0.0
        for k in range(s * ACCUM, (s + 1) * ACCUM):
            loss = model(**batches[k], num_items_in_batch=items[k]).loss
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        pre.step()
        opt.step()
        model.zero_grad()
    return model, pre, losses


def training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_trainer_with_preconditioner_callback_equals_plain_loop(arch: str, tmp_path) -> None:
    from transformers import Trainer

    from cgfac.integrations.transformers import PreconditionerCallback

    model = tiny_model(arch)
    pre = preconditioner(model)
    assert coverage(pre, model) == 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    items = record_items(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_grad_norm=1.0),
                      train_dataset=Stream(micro_batches()), optimizers=(opt, None),
                      callbacks=[PreconditionerCallback(pre)])
    trainer.train()
    want_model, want_pre, losses = plain_hf_loop(arch, 1.0, items)
    assert pre.steps == STEPS and pre.fallbacks == 0
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0]  # the loss goes down over the few steps
    assert want_pre.layer_stats().keys() == pre.layer_stats().keys()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cgfac_optim_under_hf_trainer_without_closure(arch: str, tmp_path) -> None:
    """``Trainer`` calls ``optimizer.step()`` without a closure: with ``output_fn``/``loss_fn``
    cgfac.optim runs its quadratic model and adaptive damping anyway, with a scheduler, exactly as
    the plain loop (forward and backward per micro-batch, then ``opt.step()``)."""
    from transformers import Trainer

    from cgfac.integrations.transformers import causal_lm_logits, causal_lm_loss

    def make():
        model = tiny_model(arch)
        opt = cgfac.optim.KFAC(model, loss_type="cross_entropy", damping=1.0, damping_interval=2,
                               output_fn=causal_lm_logits, loss_fn=causal_lm_loss)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)

    batches = micro_batches()
    model, opt, sched = make()
    items = record_items(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_grad_norm=0.0),
                      train_dataset=Stream(batches), optimizers=(opt, sched))
    trainer.train()

    want_model, want_opt, want_sched = make()
    for s in range(STEPS):
        for k in range(s * ACCUM, (s + 1) * ACCUM):
            want_model(**batches[k], num_items_in_batch=items[k]).loss.backward()
        want_opt.step()  # no closure, as Trainer calls it
        want_sched.step()
        want_model.zero_grad()
    with pytest.raises(ValueError, match="closure"):
        cgfac.optim.KFAC(tiny_model(arch), loss_type="cross_entropy", output_fn=causal_lm_logits).step()
    assert opt.steps == STEPS and opt.rejected_steps == want_opt.rejected_steps
    assert opt.damping == want_opt.damping and opt.damping != 1.0  # adapted at step 2, without a closure
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[-1] < logged[0]


@pytest.mark.parametrize("arch", ["gpt2"])  # Conv1D, tied head; Llama's routing: tests/optim
def test_transformer_kfac_under_hf_trainer_equals_plain_loop(arch: str, tmp_path) -> None:
    """``Trainer(optimizers=(TransformerKFAC, scheduler))`` with gradient accumulation and clipping takes
    exactly the plain loop's steps (the factor rows of every micro-batch of a step count)."""
    from transformers import Trainer

    def make():
        model = tiny_model(arch)
        opt = cgfac.optim.TransformerKFAC(model, lr=3e-3, sides="both", eig_every=2, ns_dtype=torch.float64)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)

    batches = micro_batches()
    model, opt, sched = make()
    items = record_items(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_grad_norm=1.0),
                      train_dataset=Stream(batches), optimizers=(opt, sched))
    trainer.train()

    want_model, want_opt, want_sched = make()
    for s in range(STEPS):
        for k in range(s * ACCUM, (s + 1) * ACCUM):
            want_model(**batches[k], num_items_in_batch=items[k]).loss.backward()
        torch.nn.utils.clip_grad_norm_(want_model.parameters(), 1.0)
        want_opt.step()
        want_sched.step()
        want_model.zero_grad()
    assert opt.skipped_steps == 0 and sum(r == "kron" for r in opt.routes.values()) > 0
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[-1] < logged[0]


def test_callbacks_check_their_arguments() -> None:
    from cgfac.integrations.lightning import PreconditionerCallback as LightningCallback
    from cgfac.integrations.transformers import PreconditionerCallback

    with pytest.raises(TypeError, match="preconditioner"):
        PreconditionerCallback(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="max_grad_norm"):
        PreconditionerCallback(cgfac.KFAC(nn.Linear(2, 2)), max_grad_norm=-1)
    with pytest.raises(TypeError, match="preconditioner"):
        LightningCallback(object())
