"""One training run of ``cgfac-bench train`` (:func:`train_run`), in the process that runs it: the
protocol of :mod:`cgfac_bench.train` (same weights and batches per seed, the clock on training steps
only, evaluations off the clock, the peak memory of the training phase) and the run's record."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import cgfac
from cgfac.solvers.cost import calibrate
from cgfac_bench.factory import make_optimizer
from cgfac_bench.hyper import SecondOrder
from cgfac_bench.models import build_model
from cgfac_bench.tasks import TASKS, Task, evaluate, load_arrays, task_loss

Curve = list[tuple[float, int, float]]  # (elapsed training seconds, step, loss)


# --- memory and machine --------------------------------------------------------------------------
def _status_mb(key: str) -> float | None:
    """A memory field (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in MiB, None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def _peak_rss_mb(reset_worked: bool) -> tuple[float, str]:
    if reset_worked:
        peak = _status_mb("VmHWM")
        if peak is not None:
            return peak, "training phase (VmHWM reset after setup)"
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process lifetime (ru_maxrss)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one run (in the child process) --------------------------------------------------------------
def train_run(cfg: dict[str, Any], progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """:func:`_train_run` with subnormal floats flushed, restored afterwards (the flag is global to
    the process: left on, it broke hypothesis in the test process that called this)."""
    torch.set_flush_denormal(True)
    try:
        return _train_run(cfg, progress)
    finally:
        torch.set_flush_denormal(False)


@dataclass
class _Run:
    """What a run trains, with, and on: set up by :func:`_setup`."""

    cfg: dict[str, Any]
    task: Task
    device: torch.device
    rank: int
    world: int
    data: dict[str, Tensor]
    eval_set: tuple[Tensor, Tensor]  # the fixed training subset of the training-loss curve
    held_set: tuple[Tensor, Tensor] | None  # the LM's fixed held-out sequences (None: not an LM)
    model: nn.Module
    hp: SecondOrder
    opt: torch.optim.Optimizer
    pre: cgfac.Preconditioner | None  # a preconditioner under the optimizer (kfac, cgfac-*)
    owner: cgfac.optim.SecondOrderOptimizer | None  # an optimizer that owns the update (*-adaptive)
    calibration_seconds: float

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def solver_pre(self) -> cgfac.Preconditioner | None:
        """The preconditioner, under the optimizer or inside the one that owns the update."""
        return self.owner.preconditioner if self.owner is not None else self.pre


@dataclass
class _Clock:
    """The training clock, the steps taken and the evaluations made so far."""

    budget: float
    eval_every: float
    elapsed: float = 0.0
    step: int = 0
    next_eval: float = 0.0
    diverged: bool = False
    curve: Curve = field(default_factory=list)
    heldout_curve: Curve = field(default_factory=list)  # the LM: held-out loss at the same evaluations


class _Batches:
    """The run's mini-batches: a permutation seeded by the seed, reshuffled every epoch, the
    incomplete last batch dropped; each rank takes its shard of the global batch."""

    def __init__(self, run: _Run, seed: int) -> None:
        self.run, self.size = run, run.cfg["batch_size"]
        self.n = run.data["train_x"].shape[0]
        self.order = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(self.n, generator=self.order).to(run.device), 0

    def next(self) -> tuple[Tensor, Tensor]:
        if self.pos + self.size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.order).to(self.run.device), 0
        idx = self.perm[self.pos : self.pos + self.size].chunk(self.run.world)[self.run.rank]
        self.pos += self.size
        return self.run.data["train_x"][idx], self.run.data["train_y"][idx]


def _train_run(cfg: dict[str, Any], progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Train one (optimizer, lr) pair for ``cfg["budget"]`` seconds; the run's record.

    ``cfg``: task, optimizer, lr, budget, batch_size, seed, device, threads, eval_every,
    eval_samples, data_dir (``.npy`` files of :data:`DATA_KEYS`), hyper (:class:`SecondOrder`).
    ``progress`` receives the elapsed training seconds at each evaluation.
    """
    torch.set_num_threads(cfg["threads"])
    # Subnormal floats are flushed (train_run): saturated sigmoid units produce them, and they cost
    # the CPU up to 10x per operation (K-FAC steps on the autoencoder went from 0.25 s to 3 s).
    run = _setup(cfg)
    batches = _Batches(run, cfg["seed"])

    rss_start = _status_mb("VmRSS")
    reset_worked = _reset_peak_rss()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    clock = _Clock(cfg["budget"], cfg["eval_every"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        _train(run, clock, batches, progress)

    if run.rank != 0:
        return {}  # rank 0 holds the curve and reports
    memory = {"rss_start_mb": rss_start, "reset_worked": reset_worked, "runtime_warnings": len(caught)}
    return _record(run, clock, memory)


# --- setup ---------------------------------------------------------------------------------------
def _placement(cfg: dict[str, Any]) -> tuple[torch.device, int, int]:
    """The run's device, rank and world size (several under torchrun)."""
    device = torch.device(cfg["device"])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device, rank, world


def _fixed_sets(task: Task, data: dict[str, Tensor], cfg: dict[str, Any],
                device: torch.device) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """The fixed training subset evaluated along the run (seeded by the seed) and, for the LM, the
    held-out sequences of its held-out curve: the same fixed windows for every run and seed."""
    train_x, train_y = data["train_x"], data["train_y"]
    subset = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))
    subset = subset[: cfg["eval_samples"]].to(device)
    held_set = None
    if task.lm:
        held = torch.randperm(data["test_x"].shape[0], generator=torch.Generator().manual_seed(0))
        held = held[: cfg["eval_samples"]].to(device)
        held_set = data["test_x"][held], data["test_y"][held]
    return (train_x[subset], train_y[subset]), held_set


def _setup(cfg: dict[str, Any]) -> _Run:
    """Data, model (built after ``torch.manual_seed(seed)``), optimizer; CG-FAC's cost model calibrated."""
    device, rank, world = _placement(cfg)
    task = TASKS[cfg["task"]]
    data = load_arrays(Path(cfg["data_dir"]), device)
    eval_set, held_set = _fixed_sets(task, data, cfg, device)
    torch.manual_seed(cfg["seed"])
    model: nn.Module = build_model(cfg["task"], **cfg.get("model_options", {})).to(device)
    if world > 1:  # every rank trains on its shard of the same global batch
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    hp = SecondOrder(**{**cfg["hyper"], **cfg.get("hyper_overrides", {}),
                        **({"damping": cfg["damping"]} if cfg.get("damping") else {})})
    opt, pre = make_optimizer(cfg["optimizer"], model, cfg["lr"], hp, task.loss_type)
    owner = opt if isinstance(opt, cgfac.optim.SecondOrderOptimizer) else None  # owns the update
    run = _Run(cfg, task, device, rank, world, data, eval_set, held_set, model, hp, opt, pre, owner, 0.0)
    t0 = time.perf_counter()
    if isinstance(run.solver_pre, cgfac.CGFAC) and run.solver_pre.solver == "auto":
        calibrate(str(next(model.parameters()).device), torch.float32)  # once per process
    run.calibration_seconds = time.perf_counter() - t0
    return run


# --- the loop ------------------------------------------------------------------------------------
def _train(run: _Run, clock: _Clock, batches: _Batches, progress: Callable[[float], None] | None) -> None:
    """Step until the budget is spent or a loss is not finite, evaluating every ``eval_every`` seconds."""
    while True:
        # Rank 0's clock decides when to evaluate and stop; the others follow its broadcast.
        decision = torch.tensor([clock.elapsed >= clock.next_eval or clock.elapsed >= clock.budget, 0],
                                dtype=torch.int32, device=run.device)
        if decision[0] and run.rank == 0:
            decision[1] = int(_evaluation(run, clock, progress))
        if run.distributed:
            dist.broadcast(decision, src=0)
        if decision[1]:
            break
        t0 = time.perf_counter()
        xb, yb = batches.next()
        batch_loss = _step(run, xb, yb).item()  # synchronises
        _sync(run.device)
        clock.elapsed += time.perf_counter() - t0
        clock.step += 1
        if not math.isfinite(batch_loss) and not run.distributed:  # across ranks: the evaluation sees it
            clock.diverged = True
            clock.curve.append((clock.elapsed, clock.step, batch_loss))
            break


def _evaluation(run: _Run, clock: _Clock, progress: Callable[[float], None] | None) -> bool:
    """One evaluation, off the clock, onto the curves; whether the run stops (diverged or budget spent)."""
    loss_now, _ = evaluate(run.model, run.task, *run.eval_set)
    clock.curve.append((clock.elapsed, clock.step, loss_now))
    if run.held_set is not None:
        clock.heldout_curve.append((clock.elapsed, clock.step, evaluate(run.model, run.task, *run.held_set)[0]))
    if progress is not None:
        progress(clock.elapsed)
    clock.diverged = not math.isfinite(loss_now)
    stop = clock.diverged or clock.elapsed >= clock.budget
    while clock.next_eval <= clock.elapsed:
        clock.next_eval += clock.eval_every
    return stop


def _step(run: _Run, xb: Tensor, yb: Tensor) -> Tensor:
    """One training step on the batch; its loss (before the step)."""
    if run.owner is not None:
        return _owner_step(run, run.owner, xb, yb)
    run.opt.zero_grad(set_to_none=True)
    out = run.model(xb)
    loss = task_loss(run.task, out, xb, yb)
    if run.pre is not None and run.hp.fisher == "true":
        run.pre.sample_fisher(out, run.task.loss_type)
    loss.backward()
    if run.pre is not None:
        run.pre.step()
    run.opt.step()
    return loss


def _owner_step(run: _Run, owner: cgfac.optim.SecondOrderOptimizer, xb: Tensor, yb: Tensor) -> Tensor:
    """A step of an optimizer that owns the update (``*-adaptive``), through a closure."""

    def closure() -> Tensor:
        run.opt.zero_grad(set_to_none=True)
        loss = task_loss(run.task, run.model(xb), xb, yb)
        loss.backward()
        return loss

    try:
        return owner.step(closure)
    except NotImplementedError as err:
        if "forward AD" not in str(err):
            raise
        raise RuntimeError(f"{run.cfg['optimizer']} needs forward-mode AD (torch.autograd.forward_ad) through "
                           f"the whole model for its GGN products, and this model has an operation "
                           f"without it: {str(err).splitlines()[0]}") from err


# --- the record ----------------------------------------------------------------------------------
def _record(run: _Run, clock: _Clock, memory: dict[str, Any]) -> dict[str, Any]:
    """The run's record (rank 0): the curves, test metric, memory and the solver's statistics."""
    peak_mb, peak_scope = _peak_rss_mb(memory["reset_worked"])
    test_loss, test_accuracy = evaluate(run.model, run.task, run.data["test_x"], run.data["test_y"])
    elapsed, step, curve = clock.elapsed, clock.step, clock.curve
    record: dict[str, Any] = {
        "optimizer": run.cfg["optimizer"],
        "lr": run.cfg["lr"],
        "processes": run.world,
        "steps": step,
        "train_seconds": elapsed,
        "ms_per_step": 1000 * elapsed / step if step else None,
        "diverged": clock.diverged,
        "curve": curve,
        "final_train_loss": curve[-1][2],
        "best_train_loss": min((c[2] for c in curve if math.isfinite(c[2])), default=math.nan),
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,  # the LM: next-byte accuracy over held-out positions
        "rss_start_mb": memory["rss_start_mb"],
        "peak_rss_mb": peak_mb,
        "peak_rss_scope": peak_scope,
        "runtime_warnings": memory["runtime_warnings"],
        "calibration_seconds": run.calibration_seconds,
    }
    _add_details(record, run, clock)
    return record


def _add_details(record: dict[str, Any], run: _Run, clock: _Clock) -> None:
    """CUDA memory, the solver's and the adaptive optimizer's state, the LM's bits per byte, settings."""
    if run.device.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    solver_pre = run.solver_pre
    if solver_pre is not None:
        record["fallbacks"] = solver_pre.fallbacks
        record["last_layer_stats"] = solver_pre.layer_stats()
        record["coverage"] = coverage(solver_pre)
    if run.owner is not None:
        record["final_damping"] = run.owner.damping
        record["last_step"] = run.owner.last
    if run.task.lm:  # held-out loss in bits per byte (the loss is in nats per position, one byte each)
        record["test_bits_per_byte"] = record["test_loss"] / math.log(2)
        record["final_train_bits_per_byte"] = record["final_train_loss"] / math.log(2)
        record["heldout_curve"] = clock.heldout_curve
    record["damping"] = run.hp.damping
    record["hyper"] = asdict(run.hp)
    record["seed"] = run.cfg["seed"]


def coverage(pre: cgfac.Preconditioner) -> dict[str, int]:
    """Preconditioned parameters against all trainable ones (counts of scalars)."""
    covered = {id(p) for h in pre.layers.values() for p in h.params()}
    params = [p for p in pre.model.parameters() if p.requires_grad]
    return {"covered": sum(p.numel() for p in params if id(p) in covered), "total": sum(p.numel() for p in params)}
