"""The tasks of ``cgfac-bench train`` (:data:`TASKS`): their data, loss and evaluation.

See :mod:`cgfac_bench.train` for what each task is; the models are :mod:`cgfac_bench.models`'.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgfac_bench.data import load_digits_data, load_mnist, load_stdlib_text

DATA_KEYS = ("train_x", "train_y", "test_x", "test_y")
EVAL_CHUNK = 1000
LM_EVAL_CHUNK = 64  # sequences per evaluation chunk of the LM (64 × 128 × 256 logits)
# The LM task's data (load_stdlib_text): context 128, the first 4 MiB of the training documents
# (32,263 windows of 129 bytes) and the first 256 KiB of the held-out ones (2,032 windows), so that
# the held-out evaluation after a run costs about as much as MNIST's. Tests lower the caps.
TEXT_CONTEXT = 128
TEXT_MAX_TRAIN_BYTES = 4 * 2**20
TEXT_MAX_TEST_BYTES = 256 * 2**10


@dataclass(frozen=True)
class Task:
    """How a task's data is fed and scored."""

    data: str  # "mnist", "digits" or "stdlib-text" (byte-level LM: x, y of shape (N, context))
    flatten: bool  # feed images as (N, 784) rows
    loss_type: Literal["bernoulli", "cross_entropy"]  # reconstruction or classification
    batch_size: int
    damping: float  # λ of the second-order methods
    kl_clip: float  # κ of the second-order methods
    fisher: str  # "empirical" or "true"
    curvature_samples: int | None = None  # CG-FAC's curvature rows per batch (None: the whole batch)
    eval_samples: int = 10_000  # the fixed training subset of the training-loss curve (--eval-samples)

    @property
    def lm(self) -> bool:
        """A language model: logits (batch, context, 256), the loss a mean over every position."""
        return self.data == "stdlib-text"


TASKS = {
    # 64 curvature samples: 85 ms/step instead of 173 and a lower loss after 20 s (measured here).
    "autoencoder": Task("mnist", True, "bernoulli", 1000, 1.0, 0.1, "true", 64),
    "autoencoder-tanh": Task("mnist", True, "bernoulli", 1000, 1.0, 0.1, "true", 64),
    "autoencoder-sparse": Task("mnist", True, "bernoulli", 1000, 1.0, 0.1, "true", 64),
    "mlp": Task("mnist", False, "cross_entropy", 256, 3e-3, 1e-3, "empirical"),
    "cnn": Task("mnist", False, "cross_entropy", 256, 3e-3, 1e-3, "empirical"),
    "digits": Task("digits", False, "cross_entropy", 128, 3e-3, 1e-3, "empirical"),
    "cnn-norm": Task("mnist", False, "cross_entropy", 256, 3e-3, 1e-3, "empirical"),
    # The wide tasks (issue 16): widths scaled by --width-mult / --width; CG-FAC's curvature from a
    # fixed number of rows per step (TUNED), independent of the batch.
    "autoencoder-wide": Task("mnist", True, "bernoulli", 1000, 1.0, 0.1, "true", 128),
    "mlp-wide": Task("mnist", False, "cross_entropy", 256, 3e-3, 1e-3, "empirical", 64),
    # 32 sequences of 128 bytes (4096 positions, the rows of every layer); 256 sequences evaluated.
    "transformer": Task("stdlib-text", False, "cross_entropy", 32, 3e-3, 1e-3, "empirical", eval_samples=256),
    # The Hugging Face GPT-2 task (cgfac_bench.hf): tied embeddings, Conv1D projections, the transformer
    # task's data, loss and evaluation (its tuning: cgfac_bench.tuned).
    "gpt2": Task("stdlib-text", False, "cross_entropy", 32, 1e-3, 1e-3, "empirical", eval_samples=256),
}


def model_options(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The wide tasks' width options from the command line (:data:`cgfac_bench.models.MODEL_OPTIONS`)."""
    if task == "autoencoder-wide":
        mult = args.width_mult
        return {"width_mult": int(mult) if float(mult).is_integer() else mult}
    if task == "mlp-wide":
        return {"width": args.width}
    return {}


# --- data ----------------------------------------------------------------------------------------
def load_task_data(task_name: str) -> dict[str, Tensor]:
    """The task's train/test tensors, images flattened where the model takes rows."""
    task = TASKS[task_name]
    if task.lm:
        return load_stdlib_text(TEXT_CONTEXT, TEXT_MAX_TRAIN_BYTES, TEXT_MAX_TEST_BYTES)
    data = load_mnist() if task.data == "mnist" else load_digits_data()
    if task.flatten:
        data = {k: v.reshape(v.shape[0], -1) if k.endswith("_x") else v for k, v in data.items()}
    return data


def save_arrays(data: dict[str, Tensor], directory: Path) -> None:
    """Write the task's tensors as ``.npy`` files for the spawned runs (no pickle involved)."""
    for key in DATA_KEYS:
        np.save(directory / f"{key}.npy", data[key].numpy())


def load_arrays(directory: Path, device: torch.device) -> dict[str, Tensor]:
    """The tensors :func:`save_arrays` wrote, on ``device``."""
    return {k: torch.from_numpy(np.load(directory / f"{k}.npy")).to(device) for k in DATA_KEYS}


# --- loss and evaluation -------------------------------------------------------------------------
def task_loss(task: Task, out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean over the batch of the per-sample loss (for the autoencoder: summed over pixels; for the
    LM: the mean over every position of the next-byte cross-entropy, in nats)."""
    if task.lm:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if task.loss_type == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()
    return F.cross_entropy(out, y)


def reconstruction_loss(out: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """The autoencoders' loss of one recorded forward (``cgfac.optim``'s ``loss_fn``): Bernoulli
    cross-entropy of the logits against the input, summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(out, args[0], reduction="none").sum(1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x: Tensor, y: Tensor) -> tuple[float, float | None]:
    """``(mean loss, accuracy or None)`` over ``x``, in chunks, with the model in eval mode (the
    LM: mean over every position, and the next-byte accuracy over positions)."""
    model.eval()
    total, correct = 0.0, 0
    chunk = LM_EVAL_CHUNK if task.lm else EVAL_CHUNK
    for i in range(0, x.shape[0], chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        out = model(xb)
        total += task_loss(task, out, xb, yb).item() * xb.shape[0]
        if task.loss_type == "cross_entropy":
            correct += int((out.argmax(-1 if task.lm else 1) == yb).sum())
    model.train()
    accuracy = correct / y.numel() if task.loss_type == "cross_entropy" else None
    return total / x.shape[0], accuracy
