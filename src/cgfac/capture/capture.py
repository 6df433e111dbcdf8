"""Capture: what the layer hooks record during forward and backward passes, and the true Fisher's
sampled backward.

A :class:`Recorder` is the :class:`cgfac.layers.Capture` every covered layer's hooks report to:
inputs per forward call (:class:`cgfac.layers.Chunk`), output gradients per backward, and for
``fisher="true"`` the outputs whose gradients :meth:`Recorder.sample_fisher` asks for. At the step
a layer's chunks become its :class:`cgfac.rows.Rows` (:meth:`Recorder.rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from cgfac.config import FisherKind, LossReduction, LossType, check
from cgfac.layers import Chunk, LayerHelper
from cgfac.losses import sampled_loss
from cgfac.rows import Rows

__all__ = ["Recorder", "rank_seed"]


def rank_seed(generator: torch.Generator, rank: int, world: int) -> int:
    """The seed of rank ``rank``'s sampling stream: the ``rank``-th of ``world`` numbers drawn from
    ``generator`` (which advances identically on every rank). One process draws one number, the
    seed it always used."""
    return int(torch.randint(2**62, (world,), generator=generator)[rank])


class Recorder:
    """The capture state of one preconditioner (see the module docstring).

    Args:
        fisher: "empirical" or "true" (then the user's backward supplies only ``∇W``).
        loss_reduction: "mean" or "sum", how the loss combines per-sample losses.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale the captured gradients carry, or None.
        seed: seeds the true Fisher's sampling streams (:meth:`sampling_generator`).
        rank, world: this process's rank and the number of processes (one stream per rank).
        wants_rows: whether this step's forward passes should record rows.
        limit: batch entries of each forward call whose rows are kept (``curvature_samples``; None: all).
    """

    def __init__(self, *, fisher: FisherKind, loss_reduction: LossReduction, grad_scaler: Any, seed: int, rank: int,
                 world: int, wants_rows: Callable[[], bool], limit: Callable[[], int | None]) -> None:
        self.fisher, self.loss_reduction, self.grad_scaler = fisher, loss_reduction, grad_scaler
        self.rank, self.world = rank, world
        self.wants_rows, self.limit = wants_rows, limit
        self.forward_passes = 0
        self.sampling = False
        self.sample_targets: list[tuple[list[LayerHelper], Tensor]] = []  # fisher="true": layer outputs
        self.generator = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self._routed: list[int | None] = []  # enter_experts / leave_experts

    # --- the layer hooks' protocol (cgfac.layers.Capture) --------------------------------------
    def routed_tokens(self) -> int | None:
        """Tokens ``N`` of the ``nn.ModuleList`` mixture-of-experts call now running (set by the hooks of
        :func:`cgfac.capture.registration.register` on the module holding ``experts``), or None."""
        return self._routed[-1] if self._routed else None

    def enter_experts(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook on a module holding an ``experts`` ``nn.ModuleList``: ``N``, the tokens
        of its input ``(..., H)``, for the experts' layers called inside it."""
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        self._routed.append(hidden.numel() // hidden.shape[-1] if isinstance(hidden, Tensor) and hidden.dim() else None)

    def leave_experts(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self._routed:
            self._routed.pop()

    def count_forward_pass(self, module: nn.Module, inputs: tuple) -> None:
        """A forward pre-hook on the model: numbers its forward passes (:attr:`Chunk.forward_pass`)."""
        self.forward_passes += 1

    def capturing(self, module: nn.Module) -> bool:
        """Whether a forward call of ``module`` now should record curvature rows."""
        return module.training and torch.is_grad_enabled() and self.wants_rows()

    def capture_limit(self) -> int | None:
        """Batch entries of each forward call whose rows are kept (``curvature_samples``; None:
        all): rows are built for those only (:meth:`LayerHelper.batch_size`)."""
        return self.limit()

    def record_input(self, unit: LayerHelper, a: Tensor, n: int, *, n_full: int | None = None,
                     batch: int | None = None) -> Chunk:
        """A forward call's input rows of one unit: ``n`` samples of the call's ``n_full`` (the
        rows of its first ``batch`` batch entries); its output gradient is paired later."""
        chunk = Chunk(a=a, n=n, forward_pass=self.forward_passes, n_full=n_full or n, batch=batch or n)
        unit.chunks.append(chunk)
        return chunk

    def record_output(self, units: list[LayerHelper], output: Tensor) -> None:
        """A forward call's output whose gradient gives these units' ``g`` (through a tensor hook):
        the sampled backward of the true Fisher asks for the gradients of these outputs instead of
        the parameters', so no weight gradient is computed for them."""
        if self.fisher == "true":
            self.sample_targets.append((units, output))

    def record_output_grad(self, unit: LayerHelper, chunk: Chunk, g: Tensor) -> None:
        """Output-gradient rows of a chunk (summed over backward passes)."""
        if self.fisher == "true" and not self.sampling:
            return  # the user's backward only supplies ∇W
        if self.sampling:
            g = g * chunk.n_full  # the sampled loss is a mean over this forward call's samples
            chunk.per_sample = True
        chunk.g = g if chunk.g is None else chunk.g + g

    # --- rows ---------------------------------------------------------------------------------
    def rows(self, helper: LayerHelper, dtype: torch.dtype, max_samples: int | None = None) -> Rows | None:
        """This step's rows for a layer (its chunks are taken), in ``dtype``, unscaled by any GradScaler."""
        rows = helper.take_rows(mean_reduced=self.loss_reduction == "mean", max_samples=max_samples)
        if rows is None:
            return None
        g = rows.g.to(dtype)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            g = g / self.grad_scaler.get_scale()
        return Rows(a=rows.a.to(dtype), g=g, n=rows.n)

    def discard(self, helpers: Iterable[LayerHelper]) -> None:
        """Forget everything captured since the last step."""
        for helper in helpers:
            helper.discard_rows()
        self.sample_targets = []

    def no_rows_reason(self) -> str:
        """Why a layer has no curvature rows this step."""
        hint = "call sample_fisher(outputs, loss_type) before backward" if self.fisher == "true" else (
            "no forward and backward in train mode with grad enabled")
        return f"no curvature rows captured ({hint})"

    # --- the true Fisher ----------------------------------------------------------------------
    def sampling_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator :meth:`sample_fisher` draws targets with on ``device``: seeded, on first
        use, by the ``rank``-th of ``world`` numbers drawn from the generator seeded with ``seed``
        (:func:`rank_seed`), so every rank has its own stream and one process has the stream it
        always had."""
        key = str(device)
        if key not in self.generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(rank_seed(self.generator, self.rank, self.world))
            self.generators[key] = gen
        return self.generators[key]

    def generator_state(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The seed generator's state and each device stream's (a checkpoint's ``generator`` and
        ``generators``)."""
        return self.generator.get_state(), {d: g.get_state() for d, g in self.generators.items()}

    def load_generator_state(self, generator: Tensor, streams: Mapping[str, Tensor]) -> None:
        """Restore :meth:`generator_state`: the seed generator, and the device streams given (the
        others start afresh from the seed generator on first use)."""
        self.generator.set_state(generator)
        self.generators = {}
        for device, state in streams.items():
            gen = torch.Generator(device=device)
            gen.set_state(state)
            self.generators[device] = gen

    def sample_fisher(self, outputs: Tensor, loss_type: LossType, helpers: Iterable[LayerHelper], *,
                      targets: Tensor | None = None) -> None:
        """True Fisher: sample targets from ``outputs`` and back-propagate them once (see
        :meth:`cgfac.precondition.base.Preconditioner.sample_fisher`); ``helpers``: the covered blocks."""
        if self.fisher != "true":
            raise ValueError("sample_fisher needs fisher='true' at construction")
        check("loss_type", loss_type, LossType)
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor or None, got {type(targets).__name__}")
        gen = self.sampling_generator(outputs.device) if targets is None else None
        loss = sampled_loss(outputs, loss_type, gen, targets)
        # Back-propagate to the covered layers' outputs (their tensor hooks record g) and, for
        # units captured another way (attention's projections), to their parameters.
        wrt: list[Tensor] = []
        by_output: set[int] = set()
        for units, out in self.sample_targets:
            if out.requires_grad:
                wrt.append(out)
                by_output.update(id(u) for u in units)
        self.sample_targets = []
        params = {id(p): p for h in helpers for u in h.units() if id(u) not in by_output
                  for p in u.sampling_params()}
        wrt.extend(params.values())
        self.sampling = True
        try:
            with record_function("cgfac.sampled_backward"):
                torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        finally:
            self.sampling = False
