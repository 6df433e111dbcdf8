"""Bytes each rank contributes to collectives per step, by formula, for the benchmark models.

For a covered layer with widths ``d_in`` (bias column included), ``d_out``, ``m`` local rows per
step (``n`` samples × ``T`` positions), ``b`` bytes per number and ``N`` ranks, rank ``r`` sends:

* DDP's own gradient all-reduce (the baseline every method pays): ``Σ_l d_in d_out b``.
* Every preconditioner: ``8 (L + 1)`` (int64 flags by which the ranks agree on skipping the
  step and on layers without a gradient).
* CG-FAC: ``16 L`` (row counts, int64) ``+ Σ_{l owned by r} (d_in d_out + 1) b`` (the direction
  and a flag, broadcast) plus, per layer, its curvature by one of two routes
  (:func:`cgfac.distributed.collectives.comm_bytes`): gathering rows, ``m (d_in + d_out) b`` from every rank
  but the owner, or reducing the factor sums, ``(d_in² + d_out²) b`` from every rank. With
  ``comm="auto"`` (the default) each layer takes the route with fewer mean bytes per rank,
  ``(N − 1)/N · m (d_in + d_out)`` against ``d_in² + d_out²`` (Kronecker blocks only; embeddings and
  normalisation layers always gather). Owners are the greedy assignment by ``N m d_in d_out``. A
  gathering owner *receives* ``(N − 1) m (d_in + d_out) b`` per layer, which grows with ``N``:
  bound it with ``curvature_samples`` per rank (``n = ⌈n_global / N⌉``), the ``bounded`` rows.
* K-FAC: ``Σ_l (d_in² + d_out² + 1) b / factor_update_steps`` (factor all-reduce; a ring puts
  ``2 (N − 1)/N`` times that on the wire) plus, comm-opt,
  ``Σ_{l owned by r} (d_in² + d_out² + d_in + d_out + 1) b / inv_update_steps`` (decompositions
  broadcast), or, mem-opt, ``Σ_{l owned by r} (d_in d_out + 1) b`` (directions broadcast every
  step). Owners: the greedy assignment by ``d_in³ + d_out³``.

Units are the library's registry's (``make_helper``): the projections of ``nn.MultiheadAttention``
(packed ``in_proj`` split per projection), embeddings, normalisation layers. A CG-FAC row is as
wide as the unit's ``row_widths`` (``d_in + d_out`` except an embedding, whose ``a`` row is one
token index: ``1 + d_out``). The K-FAC terms use ``d_in² + d_out²`` for every unit, an upper bound
for embeddings (diagonal input factor) and normalisation layers (per-feature blocks). Token
models (the transformer) are fed int64 tokens (:func:`cgfac_bench.models.example_input`).

The 2-process test checks these formulas against the bytes the library counts.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cgfac.distributed.collectives import choose_comm, comm_bytes, greedy_assignment
from cgfac.layers import Chunk, LayerHelper, make_helper
from cgfac_bench.models import build_model, example_input

BATCH = {"autoencoder": 256, "mlp": 256, "cnn": 128, "digits": 128, "transformer": 32, "cnn-norm": 128}


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int
    d_out: int
    rows_per_sample: int
    row_width: int = 0  # width of one curvature row a and g together (0: d_in + d_out)
    kron: bool = True  # a Kronecker block (factors can be reduced instead of rows gathered)


class _ShapeRecorder:
    """A :class:`cgfac.layers.Capture` that only notes each unit's row counts and widths."""

    def __init__(self, batch: int) -> None:
        self.batch = batch  # samples of the model's input (a Linear on a sequence counts positions as its n)
        self.shapes: list[LayerShape] = []

    def capturing(self, module: torch.nn.Module) -> bool:
        return True

    def routed_tokens(self) -> int | None:
        return None

    def capture_limit(self) -> int | None:
        return None

    def record_input(self, unit: LayerHelper, a: torch.Tensor, n: int, *, n_full: int | None = None,
                     batch: int | None = None) -> Chunk:
        self.shapes.append(LayerShape(unit.name, unit.d_in, unit.d_out, a.shape[0] // self.batch,
                                      sum(unit.row_widths), unit.structure == "kron"))
        return Chunk(a=a, n=n)

    def record_output_grad(self, unit: LayerHelper, chunk: Chunk, g: torch.Tensor) -> None:
        pass

    def record_output(self, units: list[LayerHelper], output: torch.Tensor) -> None:
        pass


def layer_shapes(model: torch.nn.Module, input_shape: tuple[int, ...] | torch.Tensor) -> list[LayerShape]:
    """Covered layers (every unit the library's registry makes) with their widths and rows per
    sample, from one forward pass of a zero input of ``input_shape`` (one sample) or of the
    given input tensor (token models take int64 inputs: :func:`cgfac_bench.models.example_input`)."""
    helpers = []
    for name, module in model.named_modules():
        helper = make_helper(name, module)
        if helper is not None and not isinstance(helper, str):
            helpers.append(helper)
    claimed = {id(m) for h in helpers for m in h.claims()}
    x = input_shape if isinstance(input_shape, torch.Tensor) else torch.zeros(1, *input_shape)
    recorder, handles = _ShapeRecorder(x.shape[0]), []
    for helper in helpers:
        if id(helper.module) not in claimed:
            handles += helper.attach(recorder)
    try:
        model(x)  # with autograd on: the hooks skip outputs that need no gradient
    finally:
        for h in handles:
            h.remove()
    return recorder.shapes


def comm_route(shape: LayerShape, rows: int, world: int, comm: str = "auto") -> str:
    """CG-FAC's route for a layer's curvature (as the library chooses it for curvature="kron")."""
    if comm not in ("auto", "gather-rows", "reduce-factors"):
        raise ValueError(f"comm must be auto, gather-rows or reduce-factors, got {comm!r}")
    if not shape.kron:
        return "gather-rows"
    if comm != "auto":
        return comm
    return choose_comm(shape.d_in, shape.d_out, rows, world, row_width=shape.row_width or None)


def per_rank_bytes(shapes: list[LayerShape], samples: int, world: int, method: str, *, number_bytes: int = 4,
                   factor_update_steps: int = 1, inv_update_steps: int = 10, comm: str = "auto") -> list[float]:
    """Mean bytes per step each rank contributes (``samples``: local samples per rank; ``comm``:
    CG-FAC's route, see :func:`comm_route`)."""
    b = number_bytes
    sent = [0.0] * world
    if method == "ddp":
        return [float(sum(s.d_in * s.d_out for s in shapes) * b)] * world
    agree = 8.0 * (len(shapes) + 1) if world > 1 else 0.0
    if method == "cgfac":
        m = {s.name: samples * s.rows_per_sample for s in shapes}
        owners = greedy_assignment({s.name: world * m[s.name] * s.d_in * s.d_out for s in shapes}, world)
        for r in range(world):
            sent[r] += 16 * len(shapes) + agree
            for s in shapes:
                if owners[s.name] == r:
                    sent[r] += (s.d_in * s.d_out + 1) * b
                if comm_route(s, m[s.name], world, comm) == "reduce-factors":
                    sent[r] += (s.d_in**2 + s.d_out**2) * b
                elif owners[s.name] != r:
                    sent[r] += m[s.name] * (s.row_width or s.d_in + s.d_out) * b
        return sent
    owners = greedy_assignment({s.name: s.d_in**3 + s.d_out**3 for s in shapes}, world)
    for r in range(world):
        sent[r] += agree + sum((s.d_in**2 + s.d_out**2 + 1) * b for s in shapes) / factor_update_steps
        for s in shapes:
            if owners[s.name] != r:
                continue
            if method == "kfac-comm-opt":
                sent[r] += (s.d_in**2 + s.d_out**2 + s.d_in + s.d_out + 1) * b / inv_update_steps
            elif method == "kfac-mem-opt":
                sent[r] += (s.d_in * s.d_out + 1) * b
            else:
                raise ValueError(f"method must be ddp, cgfac, kfac-comm-opt or kfac-mem-opt, got {method!r}")
    return sent


def projection(task: str, worlds: tuple[int, ...] = (2, 8, 64, 512)) -> list[dict]:
    """Mean and max MB per rank and step, weak scaling (the task's batch per rank)."""
    if task not in BATCH:
        raise SystemExit(f"comm: no batch size for task {task!r}; tasks: {','.join(BATCH)}")
    shapes = layer_shapes(build_model(task), example_input(task, 1))
    rows = []
    for world in worlds:
        bounded = min(BATCH[task], math.ceil(256 / world))
        for label, method, samples, comm in [
            ("DDP gradients (baseline)", "ddp", BATCH[task], "auto"),
            ("CG-FAC, all rows gathered", "cgfac", BATCH[task], "gather-rows"),
            ("CG-FAC, per-layer choice (gather rows or reduce factors)", "cgfac", BATCH[task], "auto"),
            ("CG-FAC, bounded (256 samples in all), rows gathered", "cgfac", bounded, "gather-rows"),
            ("CG-FAC, bounded (256 samples in all), per-layer choice", "cgfac", bounded, "auto"),
            ("K-FAC comm-opt", "kfac-comm-opt", BATCH[task], "auto"),
            ("K-FAC mem-opt", "kfac-mem-opt", BATCH[task], "auto"),
        ]:
            sent = per_rank_bytes(shapes, samples, world, method, comm=comm)
            rows.append({"task": task, "ranks": world, "method": label,
                         "mean_MB": sum(sent) / world / 1e6, "max_MB": max(sent) / 1e6})
    return rows


def layer_choices(task: str, worlds: tuple[int, ...] = (8, 64, 512)) -> list[dict]:
    """CG-FAC's route per layer (all rows, weak scaling) and both routes' mean MB per rank."""
    if task not in BATCH:
        raise SystemExit(f"comm: no batch size for task {task!r}; tasks: {','.join(BATCH)}")
    shapes = layer_shapes(build_model(task), example_input(task, 1))
    out = []
    for world in worlds:
        for s in shapes:
            m = BATCH[task] * s.rows_per_sample
            sizes = comm_bytes(s.d_in, s.d_out, m, world, row_width=s.row_width or None)
            out.append({"task": task, "ranks": world, "layer": s.name, "d_in": s.d_in, "d_out": s.d_out,
                        "rows_per_rank": m, "gather_MB": sizes["gather-rows"] / 1e6,
                        "reduce_MB": sizes["reduce-factors"] / 1e6 if s.kron else None,
                        "choice": comm_route(s, m, world)})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="autoencoder,mlp,cnn,transformer", help="comma-separated benchmark models")
    parser.add_argument("--out", default="runs/comm", help="output directory")


def run(args: argparse.Namespace) -> int:
    tasks = args.tasks.split(",")
    rows = [r for task in tasks for r in projection(task)]
    choices = [c for task in tasks for c in layer_choices(task)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm.json").write_text(json.dumps({"per_rank": rows, "cgfac_layer_choice": choices}, indent=1))
    lines = ["| task | ranks | method | mean MB sent per rank and step | max MB (busiest rank) |",
             "|---|---:|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['ranks']} | {r['method']} | {r['mean_MB']:.3f} | {r['max_MB']:.3f} |" for r in rows]
    per_layer = ["| task | ranks | layer | d_in × d_out | rows per rank | gather rows MB | reduce factors MB "
                 "| choice |",
                 "|---|---:|---|---|---:|---:|---:|---|"]
    per_layer += [f"| {c['task']} | {c['ranks']} | {c['layer']} | {c['d_in']} × {c['d_out']} | {c['rows_per_rank']} | "
                  f"{c['gather_MB']:.3f} | {'–' if c['reduce_MB'] is None else format(c['reduce_MB'], '.3f')} | "
                  f"{c['choice']} |" for c in choices]
    (out / "comm.md").write_text(
        __doc__ + "\nfloat32, batch per rank: " + ", ".join(f"{k} {v}" for k, v in BATCH.items()) + "\n\n"
        + "\n".join(lines) + "\n\n## CG-FAC's route per layer (all rows; mean MB per rank and step)\n\n"
        + "\n".join(per_layer) + "\n")
    print("\n".join(lines))
    print("\n".join(per_layer))
    return 0
