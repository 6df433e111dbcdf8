"""One optimizer step, itemised: where the time of a second-order step goes, against Adam's step.

For a task of :mod:`cgfac_bench.train` at its tuned settings (``TUNED``; ``--hyper`` overrides),
on one batch of the task's data: ``--warmup`` untimed steps, then ``--steps`` timed steps of the
optimizer and of Adam (wall clock, device synchronised; medians), then ``--steps`` steps under
``torch.profiler``. The library marks its parts with ``torch.profiler.record_function``; the
profile sums each mark's inclusive time per step:

* ``model.forward``, ``model.backward``: the closure's forward and backward (the benchmark's marks;
  ``model.forward`` includes ``cgfac.capture``, the layers' forward hooks building input rows, and,
  for ``fisher="true"`` under :mod:`cgfac.optim`, ``cgfac.sampled_backward``);
* ``cgfac.precondition``: ``Preconditioner.step``, of which ``cgfac.rows`` (pairing the captured
  rows, the curvature window), ``cgfac.solve`` (per layer: ``cgfac.lowrank.gram``, the rows' Gram
  and the basis ``aᵀV`` in float64; ``cgfac.eigh`` of the ``r × r`` (or ``d × d``) matrices, inside
  the former for the low-rank solve; ``cgfac.lowrank.products``),
  ``cgfac.read`` (the one device read) and ``cgfac.write`` (the directions into ``.grad``);
* ``cgfac.optim.quad_model``: the forward-mode passes of the quadratic model;
  ``cgfac.optim.damping_check``: the Levenberg–Marquardt re-evaluation (every ``T`` steps; it
  contains a forward and backward of its own, counted in ``model.*`` too).

The number of device reads in ``Preconditioner.step`` is counted as well (tensor-to-Python
conversions), and the optimizer state (the tensors of ``state_dict()``) against Adam's.

Roofline (:func:`roofline`): this machine's matrix-product peak is measured first (a square
float32 product, :func:`matmul_peak`); then, per part, the work inside it under the profiler:
matrix products (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``: ``2mnk`` flops, the profiler's own
count; bytes: their operands and result), the decompositions (``eigh`` of ``n × n``: ``9n³``;
QR of ``m × n``: ``4mn² − 4n³/3``; Cholesky: ``n³/3``) and everything else (elementwise and
reductions: their operands' bytes, no flops counted). Reported: flops and bytes per step, the
arithmetic intensity, the achieved rate over the part's time, and the matrix products' own rate
(their flops over their own time, nested products apart: forward-mode AD runs the tangents'
products inside the primal's) as a fraction of the peak (a float64 product, as in the low-rank
basis, counts against the float32 peak). Writes ``profile.json``,
``profile.md`` and ``profile.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import cgfac
from cgfac_bench.factory import make_optimizer
from cgfac_bench.hyper import ALL_OPTIMIZERS, SecondOrder, parse_hyper
from cgfac_bench.machine import default_device, machine_info
from cgfac_bench.models import build_model
from cgfac_bench.tasks import TASKS, load_task_data, model_options, task_loss
from cgfac_bench.tuned import TUNED

MARKS = ("model.forward", "cgfac.capture", "cgfac.sampled_backward", "model.backward", "cgfac.precondition",
         "cgfac.rows", "cgfac.solve", "cgfac.lowrank.gram", "cgfac.eigh", "cgfac.lowrank.products", "cgfac.read",
         "cgfac.write", "cgfac.optim.quad_model", "cgfac.optim.damping_check")
PARENT = {"cgfac.capture": "model.forward", "cgfac.sampled_backward": "model.forward",
          "cgfac.rows": "cgfac.precondition", "cgfac.solve": "cgfac.precondition", "cgfac.read": "cgfac.precondition",
          "cgfac.write": "cgfac.precondition", "cgfac.lowrank.gram": "cgfac.solve", "cgfac.eigh": "cgfac.solve",
          "cgfac.lowrank.products": "cgfac.solve"}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
DECOMPOSITION = re.compile(r"^aten::_?linalg_(eigh|qr|cholesky)(_ex)?$")


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The best rate (flop/s) of an ``n × n`` float32 matrix product on ``device`` (current threads)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _numel(shape: Any) -> int:
    return math.prod(shape) if isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape) else 0


def op_work(event: Any) -> tuple[float, float, bool]:
    """``(flops, bytes, is_matmul)`` of one profiled leaf operator (float32 operands assumed for bytes)."""
    shapes = [sh for sh in (event.input_shapes or []) if isinstance(sh, (list, tuple))]
    operand_bytes = 4.0 * sum(_numel(sh) for sh in shapes)
    name = event.name
    if name in MATMULS:
        flops = float(event.flops or 0)
        dims = [sh for sh in shapes if len(sh) >= 2]
        out = _numel(dims[-2][:-1]) * dims[-1][-1] if len(dims) >= 2 else 0
        return flops, operand_bytes + 4.0 * out, True
    square = next((sh for sh in shapes if len(sh) >= 2), None)
    if square is not None and DECOMPOSITION.search(name):
        m, n = square[-2], square[-1]
        flops = 9.0 * n**3 if "eigh" in name else 4.0 * m * n * n - 4.0 * n**3 / 3 if "qr" in name else n**3 / 3
        return flops * _numel(square[:-2] or [1]), 2 * operand_bytes, False
    return 0.0, operand_bytes, False


def roofline(events: Any, steps: int, peak: float) -> dict[str, dict[str, float]]:
    """Per mark of :data:`MARKS`: the leaf operators under it (:func:`op_work`), per step."""
    out: dict[str, dict[str, float]] = {}
    for event in events:
        if event.name not in MARKS:
            continue
        row = out.setdefault(event.name, {"ms": 0.0, "flops": 0.0, "bytes": 0.0, "mm_flops": 0.0, "mm_ms": 0.0})
        row["ms"] += event.cpu_time_total / 1000 / steps
        stack = list(event.cpu_children)
        while stack:
            child = stack.pop()
            mm = child.name in MATMULS
            if child.cpu_children and not DECOMPOSITION.search(child.name):
                stack.extend(child.cpu_children)  # a product's children: forward-mode AD's tangent products
                if not mm:
                    continue
            flops, nbytes, _ = op_work(child)
            row["flops"] += flops / steps
            row["bytes"] += nbytes / steps
            if mm:
                row["mm_flops"] += flops / steps
                row["mm_ms"] += child.self_cpu_time_total / 1000 / steps
    for row in out.values():
        row["gflops"] = row["flops"] / max(row["ms"], 1e-9) / 1e6
        row["intensity"] = row["flops"] / max(row["bytes"], 1.0)
        row["mm_fraction_of_peak"] = (row["mm_flops"] / (row["mm_ms"] / 1000) / peak) if row["mm_ms"] > 0 else 0.0
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in an optimizer's ``state_dict()`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, Tensor):
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state)
    return sum(seen.values())


def make_step(name: str, task: str, model: torch.nn.Module, x: Tensor, y: Tensor, lr: float,
              hp: SecondOrder) -> tuple[Callable[[], None], cgfac.Preconditioner | None, Any]:
    """One training step of ``name`` on the batch ``(x, y)``, with the forward and backward marked."""
    t = TASKS[task]
    opt, pre = make_optimizer(name, model, lr, hp, t.loss_type)
    owner = opt if isinstance(opt, cgfac.optim.SecondOrderOptimizer) else None

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("model.forward"):
            out = model(x)
            loss = task_loss(t, out, x, y)
            if pre is not None and hp.fisher == "true":
                pre.sample_fisher(out, t.loss_type)
        with torch.profiler.record_function("model.backward"):
            loss.backward()
        return loss

    def step() -> None:
        if owner is not None:
            owner.step(closure)
            return
        closure()
        if pre is not None:
            pre.step()
        opt.step()

    return step, (owner.preconditioner if owner is not None else pre), opt


def timed(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_reads(pre: cgfac.Preconditioner, step: Callable[[], None]) -> int:
    """Tensor-to-Python conversions inside ``pre.step()`` during one training step."""
    seen = [0]
    inner = pre.step
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def counting(name: str) -> Callable[..., Any]:
        def f(self: Tensor, *a: Any, **k: Any) -> Any:
            seen[0] += 1
            return saved[name](self, *a, **k)
        return f

    def wrapped() -> None:
        for n in READS:
            setattr(torch.Tensor, n, counting(n))
        try:
            inner()
        finally:
            for n, fn in saved.items():
                setattr(torch.Tensor, n, fn)

    pre.step = wrapped  # type: ignore[method-assign]
    try:
        step()
    finally:
        del pre.step
    return seen[0]


def run(args: argparse.Namespace) -> int:
    """:func:`_run` with subnormal floats flushed (as ``train`` does); that flag and the thread
    count are restored afterwards (both are global to the process)."""
    if args.optimizer not in ALL_OPTIMIZERS:
        raise SystemExit(f"--optimizer must be one of {ALL_OPTIMIZERS}")
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    try:
        return _run(args)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = TASKS[args.task]
    tuned = TUNED.get(args.task, {}).get(args.optimizer, {})
    hp = SecondOrder(**{**{"damping": task.damping, "kl_clip": task.kl_clip, "fisher": task.fisher,
                           "curvature_samples": task.curvature_samples},
                        **({"damping": tuned["damping"]} if "damping" in tuned else {}),
                        **tuned.get("hyper", {}), **parse_hyper(args.hyper)})
    lr = args.lr if args.lr is not None else tuned.get("lr", 1.0)
    data = load_task_data(args.task)
    batch = args.batch_size or task.batch_size
    x, y = data["train_x"][:batch].to(device), data["train_y"][:batch].to(device)
    options = model_options(args.task, args)
    results: dict[str, Any] = {}
    profiled: dict[str, float] = {}
    roof: dict[str, dict[str, float]] = {}
    peak = matmul_peak(device)
    reads = None
    for name in (args.optimizer, "adam"):
        torch.manual_seed(0)
        model = build_model(args.task, **options).to(device)
        step, pre, opt = make_step(name, args.task, model, x, y, lr if name == args.optimizer else 1e-3, hp)
        timed(step, args.warmup, device)
        wall = timed(step, args.steps, device)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        results[name] = {"ms_per_step": 1000 * statistics.median(wall), "all_ms": [1000 * t for t in wall],
                         "state_mb": state_bytes(opt.state_dict()) / 2**20, "params_mb": params / 2**20}
        if name == args.optimizer:
            if pre is not None:
                reads = count_reads(pre, step)
            with torch.profiler.profile(record_shapes=True, with_flops=True) as prof:
                for _ in range(args.steps):
                    step()
                    _sync(device)
            for event in prof.key_averages():
                if event.key in MARKS:
                    profiled[event.key] = profiled.get(event.key, 0.0) + event.cpu_time_total / 1000 / args.steps
            roof = roofline(prof.events(), args.steps, peak)
        del model, step, pre, opt
    ours, adam = results[args.optimizer]["ms_per_step"], results["adam"]["ms_per_step"]
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
        "machine": machine_info(args.device, args.threads), "model_options": options, "lr": lr,
        "hyper": {k: v for k, v in vars(hp).items()}, "steps": results, "ratio_to_adam": ours / adam,
        "state_ratio_to_adam": results[args.optimizer]["state_mb"] / max(results["adam"]["state_mb"], 1e-12),
        "parts_ms_per_step": {k: profiled[k] for k in MARKS if k in profiled}, "host_reads_in_pre_step": reads,
        "matmul_peak_gflops": peak / 1e9, "roofline": {k: roof[k] for k in MARKS if k in roof},
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(out / "profile.md", record, args)
    write_plot(out / "profile.png", record, args)
    print((out / "profile.md").read_text())
    return 0


def write_markdown(path: Path, record: dict[str, Any], args: argparse.Namespace) -> None:
    m, steps = record["machine"], record["steps"]
    ours = steps[args.optimizer]["ms_per_step"]
    lines = [f"# One step of {args.optimizer} on {args.task} {record['model_options'] or ''}", "",
             f"Batch {args.batch_size or TASKS[args.task].batch_size}, device {m['device']}, {m['threads']} threads, "
             f"{m['cpu_model']}, torch {m['torch']}. Medians of {args.steps} steps after {args.warmup} warm-up steps.",
             "", f"- {args.optimizer}: **{ours:.0f} ms/step**; Adam: {steps['adam']['ms_per_step']:.0f} ms/step "
             f"(ratio {record['ratio_to_adam']:.2f}).",
             f"- Optimizer state (tensors of `state_dict()`, after {args.warmup + args.steps} steps): "
             f"{steps[args.optimizer]['state_mb']:.0f} MiB against Adam's {steps['adam']['state_mb']:.0f} MiB "
             f"(ratio {record['state_ratio_to_adam']:.2f}; parameters {steps['adam']['params_mb']:.0f} MiB).",
             f"- Device reads inside `Preconditioner.step()`: {record['host_reads_in_pre_step']}.", "",
             "Parts (inclusive time per step under the profiler, which adds overhead; nested parts are indented):",
             "", "| part | ms/step | share of the step |", "|---|---|---|"]
    for key, ms in record["parts_ms_per_step"].items():
        depth = 0
        parent = PARENT.get(key)
        while parent is not None:
            depth += 1
            parent = PARENT.get(parent)
        lines.append(f"| {'&nbsp;&nbsp;' * 2 * depth}{key} | {ms:.1f} | {ms / ours:.0%} |")
    path.write_text("\n".join(lines + roofline_lines(record)) + "\n")


def roofline_lines(record: dict[str, Any]) -> list[str]:
    """The roofline table of :func:`roofline` (per step; rates against the measured peak)."""
    peak = record["matmul_peak_gflops"]
    lines = ["", f"Roofline (matrix-product peak measured here: **{peak:.0f} GFLOP/s**, a 2048² float32 product; "
             "per step, under the profiler; products' rate: their flops over their own time):", "",
             "| part | ms | GFLOP | MB moved | flop/byte | GFLOP/s over the part | of peak | products' GFLOP/s | "
             "products of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in record["roofline"].items():
        mm_rate = row["mm_flops"] / max(row["mm_ms"] / 1000, 1e-12) / 1e9 if row["mm_ms"] > 0 else 0.0
        lines.append(f"| {key} | {row['ms']:.1f} | {row['flops'] / 1e9:.2f} | {row['bytes'] / 1e6:.0f} | "
                     f"{row['intensity']:.1f} | {row['gflops']:.1f} | {row['gflops'] / peak:.0%} | "
                     f"{mm_rate:.1f} | {row['mm_fraction_of_peak']:.0%} |")
    return lines


def write_plot(path: Path, record: dict[str, Any], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {k: v for k, v in record["parts_ms_per_step"].items() if PARENT.get(k) in (None, "cgfac.precondition",
                                                                                      "model.forward")}
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(parts) + 1.8))
    names = list(parts)[::-1]
    ax.barh(names, [parts[n] for n in names])
    ax.axvline(record["steps"]["adam"]["ms_per_step"], color="grey", linestyle="--", label="Adam's whole step")
    ax.set_xlabel("ms per step (inclusive)")
    ax.set_title(f"{args.optimizer}: {record['steps'][args.optimizer]['ms_per_step']:.0f} ms/step "
                 f"({record['ratio_to_adam']:.2f}x Adam)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=tuple(TASKS), default="autoencoder-wide")
    parser.add_argument("--optimizer", default="cgfac-kron-adaptive")
    parser.add_argument("--width-mult", type=float, default=4.0, help="autoencoder-wide: hidden widths times this")
    parser.add_argument("--width", type=int, default=2048, help="mlp-wide: hidden width")
    parser.add_argument("--lr", type=float, default=None, help="default: the tuned one")
    parser.add_argument("--hyper", default=None, help="SecondOrder fields overriding the tuned ones (as train's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/profile"))
