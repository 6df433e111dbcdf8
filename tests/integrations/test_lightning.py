"""The Lightning ``Trainer`` callback (:mod:`cgfac.integrations.lightning`) with a preconditioner, for
real: tiny random GPT-2 and Llama (float64, CPU), a few steps with gradient accumulation and clipping,
against a plain loop of the same steps (same batches, same order)."""

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

pytest.importorskip("transformers")

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lightning_trainer_with_preconditioner_callback_equals_plain_loop(arch: str, tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    from cgfac.integrations.lightning import PreconditionerCallback

    class LM(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    batches = micro_batches()
    want = tiny_model(arch)
    want_pre = preconditioner(want)
    opt = torch.optim.AdamW(want.parameters(), lr=3e-3)
    for s in range(STEPS):
        for b in batches[s * ACCUM: (s + 1) * ACCUM]:
            (want(**b).loss / ACCUM).backward()
        want_pre.step()  # Lightning: the callback, then clipping, then the optimizer
        torch.nn.utils.clip_grad_norm_(want.parameters(), 1.0)
        opt.step()
        want.zero_grad()

    module = LM(tiny_model(arch))
    pre = preconditioner(module.model)
    loader = torch.utils.data.DataLoader(Stream(batches), batch_size=MICRO)
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=1.0, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[PreconditionerCallback(pre)],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    assert pre.steps == STEPS and coverage(pre, module.model) == 1.0
    for (name, p), q in zip(module.model.named_parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    per_step = [sum(module.losses[s * ACCUM: (s + 1) * ACCUM]) for s in range(STEPS)]
    assert per_step[-1] < per_step[0]
    assert module.model.lm_head.weight.shape[0] == VOCAB
