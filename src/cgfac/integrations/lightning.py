"""Lightning: a preconditioner under ``lightning.pytorch.Trainer`` (or ``pytorch_lightning``).

``Trainer(callbacks=[PreconditionerCallback(pre)])`` with the LightningModule's own optimizer:
Lightning's automatic optimization runs ``training_step`` and ``backward`` for every micro-batch
(``accumulate_grad_batches``; the hooks capture each one's rows), then ``on_before_optimizer_step``
— where the callback calls ``pre.step()`` — then **clipping** (``gradient_clip_val``), then
``optimizer.step()``. Lightning clips *after* the callback, so ``gradient_clip_val`` bounds the
preconditioned step (Hugging Face's ``Trainer`` clips before; see
:mod:`cgfac.integrations.transformers`). The plain loop is
``backward(); pre.step(); clip_grad_norm_(...); opt.step()``.

``cgfac.optim`` optimizers need no callback under Lightning: its automatic optimization always
calls ``optimizer.step(closure)``, the closure running ``training_step`` and ``backward``, which
is what ``cgfac.optim`` asks of a closure (the module must return a tensor from ``forward``, or
give ``output_fn``).
"""

from __future__ import annotations

from typing import Any

from cgfac.precondition.base import Preconditioner


def _callback_class() -> Any:
    """Lightning's ``Callback`` (``lightning``, else the standalone ``pytorch_lightning``)."""
    import importlib

    for package in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            return importlib.import_module(package).Callback
        except ImportError:  # pragma: no cover - the other package
            continue
    raise ImportError("cgfac.integrations.lightning needs lightning: pip install 'cgfac[lightning]'")


Callback: Any = _callback_class()

__all__ = ["PreconditionerCallback"]


class PreconditionerCallback(Callback):
    """Calls ``preconditioner.step()`` in ``on_before_optimizer_step`` (before Lightning's
    gradient clipping and ``optimizer.step()``)."""

    def __init__(self, preconditioner: Preconditioner) -> None:
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"preconditioner must be a cgfac Preconditioner, got {type(preconditioner).__name__}")
        self.preconditioner = preconditioner

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.preconditioner.step()
