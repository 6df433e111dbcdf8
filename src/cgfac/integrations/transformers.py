"""Hugging Face ``transformers``: the preconditioners and ``cgfac.optim`` under ``Trainer``.

**A preconditioner with any optimizer** (``torch.optim`` or ``Trainer``'s own)::

    pre = cgfac.KFAC(model, lr=3e-4, ...)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    Trainer(model, args, train_dataset=..., optimizers=(opt, None),
            callbacks=[PreconditionerCallback(pre)]).train()

``Trainer``'s step, per optimizer step: the forward and backward of every micro-batch of the
gradient accumulation (the preconditioner's hooks capture every micro-batch's rows; the loss of
the accumulated step is the mean over all of them, as with one large batch), then **clipping**
(``args.max_grad_norm``, default 1.0: ``Trainer`` clips the raw gradient *before* any callback),
then ``on_pre_optimizer_step`` — where :class:`PreconditionerCallback` calls ``pre.step()``, so the
preconditioner sees the clipped gradient (the direction is linear in it; the curvature rows are
the unclipped per-sample gradients) — then ``optimizer.step()``, the scheduler and
``model.zero_grad()``. To bound the *preconditioned* step instead, set ``max_grad_norm=0`` in the
``TrainingArguments`` and ``PreconditionerCallback(pre, max_grad_norm=c)``, which clips after
``pre.step()`` (or use the KL clip, ``kl_clip``). This is the plain loop
``backward() (each micro-batch); clip_grad_norm_(model.parameters(), c); pre.step(); opt.step()``.

**cgfac.optim under Trainer** (``optimizers=(opt, scheduler)``): ``Trainer`` calls
``optimizer.step()`` without a closure, and its models return a ``ModelOutput``, not a tensor.
``cgfac.optim`` needs the model's outputs for its quadratic model and, for adaptive damping, the
loss at the new point; give it both readers::

    opt = cgfac.optim.KFAC(model, loss_type="cross_entropy", output_fn=causal_lm_logits,
                           loss_fn=causal_lm_loss)

``output_fn`` picks the logits whose cross-entropy the loss is (``logits[:, :-1]``: the
positions with a next-token label); ``loss_fn`` recomputes each recorded forward's mean loss, so
``step()`` without a closure evaluates ``h(θ + δ)`` by re-running the recorded forwards (their
inputs and random state) at the new point. Set ``max_grad_norm=0``: the quadratic model sets the
step length from the true gradient, which clipping would rescale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - the extra is not installed
    raise ImportError("cgfac.integrations.transformers needs transformers: pip install 'cgfac[hf]'") from err

from cgfac.precondition.base import Preconditioner

__all__ = ["PreconditionerCallback", "causal_lm_logits", "causal_lm_loss"]


class PreconditionerCallback(TrainerCallback):
    """Calls ``preconditioner.step()`` in ``on_pre_optimizer_step`` (after ``Trainer``'s clipping,
    before ``optimizer.step()``); with ``max_grad_norm`` it then clips the preconditioned
    gradients of the model to that norm (see the module docstring for the order)."""

    def __init__(self, preconditioner: Preconditioner, *, max_grad_norm: float | None = None) -> None:
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"preconditioner must be a cgfac Preconditioner, got {type(preconditioner).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self.preconditioner = preconditioner
        self.max_grad_norm = max_grad_norm

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.preconditioner.step()
        if self.max_grad_norm is not None:
            params = [p for p in self.preconditioner.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return control


def _logits(output: Any) -> Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model output has no logits tensor ({type(output).__name__})")
    return logits


def causal_lm_logits(output: Any) -> Tensor:
    """A causal language model's logits at the positions that have a next-token label,
    ``output.logits[:, :-1]`` (the rows of ``cgfac.optim``'s quadratic model)."""
    return _logits(output)[:, :-1]


def causal_lm_loss(output: Any, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The mean next-token cross-entropy of one forward (``labels`` from its inputs, ``-100``
    ignored), whatever ``num_items_in_batch`` scaling ``Trainer`` gave the model's own loss."""
    labels = kwargs.get("labels")
    if labels is None:
        labels = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(labels, Tensor):
        raise ValueError("causal_lm_loss: the forward had no labels or input_ids tensor")
    logits = causal_lm_logits(output)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


