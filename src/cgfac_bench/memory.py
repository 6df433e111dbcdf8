"""Today's language models at real sizes: a few steps per optimizer, ms per step and peak resident memory.

``--model gpt2`` (default): GPT-2 small; ``--model moe``: a ~100 M-parameter mixture of experts,
:func:`moe_model` (Mixtral's classes: 6 layers of width 512, 8 experts of width 1024 with top-2
routing, vocabulary 32000, transformers ≥ 5's 3-D expert parameters).

Each optimizer runs in a fresh subprocess (``python -m cgfac_bench.memory --one NAME``), so its
peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: the model
(``GPT2LMHeadModel(GPT2Config())``, 124 M parameters, vocabulary 50257, head tied to the token
embedding, random initialisation, nothing downloaded), one batch of random tokens
(``batch × seq``, default 2 × 64), and ``steps`` steps of forward, backward, ``pre.step()`` and the
optimizer's step. Optimizers:

* ``kfac``: ``cgfac.KFAC`` with the README's transformer settings (:data:`PRE_SETTINGS`), under
  ``torch.optim.SGD`` with momentum 0.9 (the benchmarks' pairing for a preconditioner);
* ``cgfac``: ``cgfac.CGFAC`` with the same settings where it has them (its solver ``"auto"``), same SGD;
* ``adamw``: ``torch.optim.AdamW`` alone;
* ``muon``: ``torch.optim.Muon`` on the hidden matrices (``cgfac.optim.hidden_matrices``;
  ``adjust_lr_fn="match_rms_adamw"``), AdamW on the rest; a 3-D expert parameter, which
  ``torch.optim.Muon`` refuses, goes to AdamW. Its bfloat16 Newton–Schulz is emulated on a CPU
  without bfloat16 matrix units (GPT-2 small: two steps not done after 13 min here, one thread, cores shared);
* ``muon-f32``: Muon's update with float32 Newton–Schulz (``TransformerKFAC(power=0)``, the LM
  benchmark's ``muon-f32``; experts one by one): the same state as ``muon``;
* ``tkfac``: ``cgfac.optim.TransformerKFAC`` with the language-model benchmark's tuned settings
  (:data:`TKFAC_SETTINGS`; experts one by one).

Each optimizer's state (bytes of the tensors in ``opt.state``, the preconditioner's planned state
for K-FAC and CG-FAC) is reported beside the peak.

``--memory-budget`` is passed to the preconditioners (default: theirs, a quarter of the RAM). Step 1
of K-FAC folds in the first factors and eigendecomposes every block (``inv_update_steps``), the
later steps only solve; each step's time is reported. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

OPTIMIZERS = ("kfac", "cgfac", "adamw", "muon", "muon-f32", "tkfac")
MODELS = ("gpt2", "moe")
TKFAC_SETTINGS: dict[str, Any] = {"direction": "ortho", "sides": "input", "power": -0.5, "rows": 128,
                                  "factor_every": 32, "eig_every": 32}
PRE_SETTINGS: dict[str, Any] = {"damping": 0.1, "kl_clip": None, "graft": "rmsprop", "damping_form": "factored",
                                "curvature_samples": 8}
KFAC_ONLY: dict[str, Any] = {"factor_update_steps": 5, "inv_update_steps": 20}  # CG-FAC has no such settings
TIED = "transformer.wte+lm_head"


def moe_model() -> Any:
    """A ~100 M-parameter Mixtral (random): 6 layers, width 512, 8 experts of width 1024 (top 2),
    8 heads (2 key-value heads), vocabulary 32000, untied head."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                                            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                                            num_local_experts=8, num_experts_per_tok=2,
                                            max_position_embeddings=512))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--model", choices=MODELS, default="gpt2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory-budget", type=float, default=None, help="the preconditioners' memory_budget")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per optimizer (its steps so far are kept)")
    parser.add_argument("--one", choices=OPTIMIZERS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, default=None, help=argparse.SUPPRESS)


def rss_bytes() -> int:
    """The current resident set (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_optimizer(args: argparse.Namespace, model: Any, out: dict[str, Any]) -> tuple[Any, Any]:
    """``args.one``'s optimizer over ``model`` (SGD with momentum under a preconditioner, whose plan
    goes into ``out``), and the preconditioner (None for the others)."""
    import torch

    import cgfac

    pre: cgfac.KFAC | cgfac.CGFAC | None = None
    if args.one == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    elif args.one == "muon-f32":
        opt = cgfac.optim.TransformerKFAC(model, lr=1e-4, weight_decay=0.01, power=0.0, ns_dtype=torch.float32)
    elif args.one == "tkfac":
        opt = cgfac.optim.TransformerKFAC(model, lr=1e-4, weight_decay=0.01, **TKFAC_SETTINGS)
    elif args.one == "muon":
        from cgfac_bench.peers import CombinedOptimizer

        hidden, rest = cgfac.optim.hidden_matrices(model)
        muon = torch.optim.Muon([cast(torch.Tensor, m.weight) for _, m in hidden], lr=1e-4, weight_decay=0.01,
                                adjust_lr_fn="match_rms_adamw")
        opt = CombinedOptimizer([muon, torch.optim.AdamW(rest, lr=1e-4, weight_decay=0.01)])
    else:
        if args.one == "kfac":
            pre = cgfac.KFAC(model, **PRE_SETTINGS, **KFAC_ONLY, memory_budget=args.memory_budget)
        else:
            pre = cgfac.CGFAC(model, **PRE_SETTINGS, memory_budget=args.memory_budget)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        assert pre is not None
        out["planned_state_bytes"] = sum(m.bytes for m in pre.memory_plan.values())
        out["budget"] = str(pre.memory_budget)
        out["tied_block"] = str(pre.memory_plan[TIED]) if TIED in pre.memory_plan else "-"
        out["forms"] = sorted({m.form for m in pre.memory_plan.values()})
    return opt, pre


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One optimizer's steps in this process (see the module docstring)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel


    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = moe_model() if args.model == "moe" else GPT2LMHeadModel(GPT2Config())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {"optimizer": args.one, "params": sum(p.numel() for p in model.parameters()),
                           "rss_model_bytes": rss_bytes(), "threads": torch.get_num_threads(), "model": args.model}
    opt, pre = build_optimizer(args, model, out)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        times.append(1e3 * (time.perf_counter() - start))
        out.setdefault("losses", []).append(float(loss))
        out["ms_per_step"] = times
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
        if args.progress is not None:  # the steps so far survive a timeout
            args.progress.write_text(json.dumps(out))
    from cgfac_bench.lm import state_bytes

    out["state_bytes"] = state_bytes(opt)  # the optimizer's own (SGD's momentum under a preconditioner)
    if pre is not None:
        out["fallbacks"] = pre.fallbacks
        if TIED in pre.layer_stats():
            out["tied_stats"] = {k: v for k, v in pre.layer_stats()[TIED].items() if isinstance(v, (str, int, float))}
    if args.progress is not None:  # the parent reads this file: with the state and stats
        args.progress.write_text(json.dumps(out))
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str, machine: str) -> str:
    adamw = next((r for r in results if r["optimizer"] == "adamw" and "peak_rss_bytes" in r), None)
    model_text = ("`GPT2LMHeadModel(GPT2Config())` (vocabulary 50257, head tied to the token embedding)"
                  if args.model == "gpt2" else "`cgfac_bench.memory.moe_model()` (Mixtral, 8 experts, top 2)")
    lines = [
        f"# {'GPT-2 small' if args.model == 'gpt2' else 'A ~100 M-parameter mixture of experts'} at its real size: "
        "ms per step and peak memory", "",
        f"Command: `{command}`", "",
        f"Machine: {machine}; {results[0].get('threads', '?')} torch threads, CPU, float32.", "",
        f"Model: {model_text} ({results[0].get('params', 0) / 1e6:.1f} M parameters), random initialisation; "
        f"batch {args.batch} × {args.seq} random "
        f"tokens; {args.steps} steps each (forward, backward, `pre.step()`, the optimizer's step), each optimizer in "
        "a fresh process. K-FAC and CG-FAC: "
        f"`{', '.join(f'{k}={v!r}' for k, v in PRE_SETTINGS.items())}` (K-FAC also "
        f"`{', '.join(f'{k}={v!r}' for k, v in KFAC_ONLY.items())}`) under SGD (momentum 0.9); AdamW alone; "
        "Muon (`torch.optim.Muon`, bfloat16 Newton–Schulz, emulated on this CPU; `muon-f32`: its update in float32) "
        "on the hidden matrices, AdamW on the rest; TransformerKFAC with "
        f"`{', '.join(f'{k}={v!r}' for k, v in TKFAC_SETTINGS.items())}`. State: the optimizer's tensors (under "
        "K-FAC and CG-FAC: SGD's momentum, and the preconditioner's planned state beside it).", "",
        "| optimizer | ms per step (step 1, 2, ...) | peak RSS | × AdamW's | RSS after building the model | "
        "optimizer state | planned preconditioner state | tied block |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "peak_rss_bytes" not in r:
            lines.append(f"| {r['optimizer']} | failed: {r.get('error', '?')} | | | | | | |")
            continue
        if "error" in r:
            r = {**r, "tied_block": f"{r.get('tied_block', '-')} **{len(r['ms_per_step'])} of {args.steps} steps: "
                 f"{r['error']}**"}
        ratio = f"{r['peak_rss_bytes'] / adamw['peak_rss_bytes']:.2f}" if adamw else "-"
        planned = f"{r['planned_state_bytes'] / 1e9:.2f} GB" if "planned_state_bytes" in r else "-"
        lines.append(f"| {r['optimizer']} | {', '.join(f'{t:.0f}' for t in r['ms_per_step'])} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {ratio} | {r['rss_model_bytes'] / 1e9:.2f} GB | "
                     f"{r.get('state_bytes', 0) / 1e9:.2f} GB | {planned} | "
                     f"{r.get('tied_block', '-')} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return 0
    results = []
    for name in args.optimizers:
        cmd = [sys.executable, "-m", "cgfac_bench.memory", "--one", name, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.memory_budget is not None:
            cmd += ["--memory-budget", repr(args.memory_budget)]
        with tempfile.TemporaryDirectory() as tmp:
            progress = Path(tmp) / "progress.json"
            cmd += ["--progress", str(progress)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                error = None if proc.returncode == 0 else \
                    f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {args.timeout:g} s"
            result = json.loads(progress.read_text()) if progress.exists() else {"optimizer": name}
        if error is not None:
            result["error"] = error
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        from cgfac_bench.machine import cpu_model

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        command = "cgfac-bench memory " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "cgfac-bench memory"
        (args.out / "results.md").write_text(markdown(results, args, command, cpu_model()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cgfac-bench memory", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
