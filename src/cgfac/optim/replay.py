"""The forwards an optimizer step records and replays: inputs, random state and detached outputs.

:class:`ForwardRecorder` hooks the model's root: each training forward with grad enabled is kept as
a :class:`Forward` (its inputs, the CPU/CUDA random state before it, its outputs and, with
``loss_fn``, its loss). The step then replays them: the quadratic model's forward-mode passes, the
loss at the new point (:meth:`ForwardRecorder.replay_loss`) and the true Fisher sampled on a subset
(:meth:`ForwardRecorder.sample_subset`), each under :func:`replayed_rng` so that dropout draws the
same masks as the recorded forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cgfac.config import LossType
from cgfac.precondition.base import Preconditioner

__all__ = ["Forward", "ForwardRecorder", "closure_value", "evaluation_loss", "replayed_rng"]


class Forward:
    """One recorded forward pass of the model: its inputs, RNG state and (detached) outputs."""

    __slots__ = ("args", "kwargs", "loss", "outputs", "rng", "rows")

    def __init__(self, args: tuple, kwargs: dict, outputs: Tensor, rng: dict[str, Tensor],
                 loss: float | None = None) -> None:
        self.args, self.kwargs, self.outputs, self.rng, self.loss = args, kwargs, outputs, rng, loss
        self.rows = outputs.reshape(-1, outputs.shape[-1]).shape[0] if outputs.dim() > 0 else 1


@contextlib.contextmanager
def replayed_rng(rng: dict[str, Tensor]) -> Iterator[None]:
    """The random state of a recorded forward inside, the caller's restored after."""
    devices = [torch.cuda.current_device()] if "cuda" in rng else []
    with torch.random.fork_rng(devices=devices):
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        yield


class ForwardRecorder:
    """The root hooks of a model under a :class:`~cgfac.optim.SecondOrderOptimizer`: each training
    forward with grad enabled is appended to :attr:`forwards` (while :attr:`recording`); with
    ``fisher="true"`` its sampled backward runs at once, unless it is deferred to
    :meth:`sample_subset`."""

    def __init__(self, model: nn.Module, preconditioner: Preconditioner, *, loss_type: str | None,
                 needs_tensor: bool, sample_subset: bool, output_fn: Callable[[Any], Tensor] | None,
                 loss_fn: Callable[[Any, tuple, dict], Tensor] | None) -> None:
        self.model, self.preconditioner = model, preconditioner
        self.loss_type, self.needs_tensor, self.subset = loss_type, needs_tensor, sample_subset
        self.output_fn, self.loss_fn = output_fn, loss_fn
        self.batch_dependent = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.forwards: list[Forward] = []
        self.recording = True
        self.rng: dict[str, Tensor] = {}
        self.handle: RemovableHandle | None = model.register_forward_hook(self.root_hook, with_kwargs=True)
        self.pre_handle: RemovableHandle | None = model.register_forward_pre_hook(self.root_pre_hook)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No forward is recorded inside (the step's own forwards)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.recording and module.training and torch.is_grad_enabled():
            self.rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.rng["cuda"] = torch.cuda.get_rng_state()

    def root_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self.recording and module.training and torch.is_grad_enabled()):
            return
        raw = output
        if self.output_fn is not None:
            output = self.output_fn(output)
        if not isinstance(output, Tensor):
            if self.needs_tensor:
                raise TypeError(f"the model must return a Tensor for the quadratic model and the true Fisher, "
                                f"got {type(output).__name__} (give output_fn to pick it)")
            return
        loss = None
        if self.loss_fn is not None:
            with torch.no_grad():
                loss = float(self.loss_fn(raw, args, kwargs))
        self.forwards.append(Forward(args, kwargs, output.detach(), self.rng, loss))
        if self.preconditioner.fisher == "true" and output.requires_grad and not self.subset_sampling(args):
            self.preconditioner.sample_fisher(output, cast(LossType, self.loss_type or ""))

    def subset_sampling(self, args: tuple) -> bool:
        """Whether the true Fisher's sampled backward runs on a forward of the kept samples alone
        (:meth:`sample_subset`): ``sample_subset``, ``curvature_samples`` below this forward's
        batch, and no module whose training forward depends on the batch (BatchNorm)."""
        limit = getattr(self.preconditioner, "curvature_samples", None)
        first = next((a for a in args if isinstance(a, Tensor) and a.dim() > 0), None)
        return (self.subset and limit is not None and first is not None and first.shape[0] > limit
                and not self.batch_dependent)

    @torch.no_grad()
    def sample_subset(self, forwards: list[Forward]) -> None:
        """True Fisher from a forward of the first ``curvature_samples`` batch entries only.

        The user's backward through the whole batch gives ``∇W``; the curvature needs the sampled
        targets' output gradients of the kept entries alone, so instead of a second backward
        through the whole batch (to every layer's output) the kept entries are run forward again
        (same parameters and random state, buffers untouched) and their sampled loss is
        back-propagated: ``m/n`` of a forward and of a backward to the layers' outputs, for
        ``m = curvature_samples`` of a batch of ``n``. The rows are those the full pass would keep.
        """
        pre = self.preconditioner
        left = cast(int, pre.capture_limit())
        named = dict(self.model.named_parameters())
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        with self.paused():
            for fwd in forwards:
                if left <= 0:
                    break
                first = next(a for a in fwd.args if isinstance(a, Tensor) and a.dim() > 0)
                k = min(left, first.shape[0])
                left -= k
                args = tuple(a[:k] if isinstance(a, Tensor) and a.dim() > 0 else a for a in fwd.args)
                with replayed_rng(fwd.rng), torch.enable_grad(), \
                        torch.profiler.record_function("cgfac.optim.subset_forward"):
                    out = torch.func.functional_call(self.model, {**named, **buffers}, args, fwd.kwargs)
                    pre.sample_fisher(out, cast(LossType, self.loss_type or ""))

    def recorded_loss(self, forwards: list[Forward]) -> float | None:
        """``h(θ)`` from ``loss_fn`` at the recorded forwards: their rows-weighted mean."""
        if self.loss_fn is None or not forwards or any(f.loss is None for f in forwards):
            return None
        total = sum(f.rows for f in forwards)
        return sum(cast(float, f.loss) * f.rows for f in forwards) / total

    def replay_loss(self, forwards: list[Forward]) -> float:
        """``h`` at the current parameters: the recorded forwards re-run (inputs, random state)
        without grad, their ``loss_fn`` averaged by rows (the closure of ``step()`` without one)."""
        assert self.loss_fn is not None
        total, rows = 0.0, 0
        for fwd in forwards:
            with replayed_rng(fwd.rng), torch.no_grad():
                out = self.model(*fwd.args, **fwd.kwargs)
                total += float(self.loss_fn(out, fwd.args, fwd.kwargs)) * fwd.rows
            rows += fwd.rows
        return total / rows

    def remove(self) -> None:
        for h in (self.handle, self.pre_handle):
            if h is not None:
                h.remove()
        self.handle = self.pre_handle = None


def closure_value(closure: Callable[[], Any]) -> float:
    """The loss a closure returns, as a float (grad enabled: the closure runs its backward)."""
    with torch.enable_grad():
        loss = closure()
    if loss is None:
        raise ValueError("closure must return the loss")
    return float(loss.detach() if isinstance(loss, Tensor) else loss)


def evaluation_loss(model: nn.Module, recorder: ForwardRecorder, pre: Preconditioner,
                    closure: Callable[[], Any]) -> float:
    """The closure's loss as an evaluation, not a training forward: capture paused, the rows it
    captured discarded, the model's buffers (BatchNorm running statistics) restored."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    with recorder.paused():
        try:
            return closure_value(closure)
        finally:
            pre.discard_captured()
            for b, saved in buffers:
                b.copy_(saved)
