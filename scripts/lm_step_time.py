"""Interleaved step times of language-model optimizers (nanoGPT task sizes), one thread.

Every optimizer gets its own model; the iterations (forward, backward, step) run round-robin, one
iteration of each optimizer per round, so drift in the shared machine's speed reaches every
optimizer alike. Reports the mean ms per iteration over the timed rounds (after ``--warmup``),
each optimizer's ratio to the first one's, and the optimizer step's own mean and median (their
difference: the periodic refreshes, amortised). Usage::

    python scripts/lm_step_time.py --task nanogpt-s --rounds 300 \\
        muon-f32 "tkfac-ortho-input:rows=128,factor_every=10,eig_every=10"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from cgfac_bench.lm import LM_TASKS, PROSE_VOCAB, TUNED_LM, make_lm_optimizer, parse_lm_hyper
from cgfac_bench.models import NanoGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="nanogpt-s", choices=sorted(LM_TASKS))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("specs", nargs="+", help="optimizer or optimizer:hyper (cgfac-bench train's --hyper syntax)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = LM_TASKS[args.task]
    runs = []
    for spec in args.specs:
        name, _, hyper_text = spec.partition(":")
        tuned = TUNED_LM.get(args.task, {}).get(name, {"lr": 4e-3, "wd": 0.1})
        hyper = {**tuned.get("hyper", {}), **parse_lm_hyper(hyper_text or None)}
        torch.manual_seed(0)
        model = NanoGPT(PROSE_VOCAB, task.context, task.width, task.depth, task.heads, task.experts)
        opt = make_lm_optimizer(name, model, tuned["lr"], tuned["wd"], hyper)
        runs.append({"spec": spec, "model": model, "opt": opt, "times": [], "steps": []})
    gen = torch.Generator().manual_seed(0)
    for it in range(args.warmup + args.rounds):
        x = torch.randint(0, PROSE_VOCAB, (task.batch, task.context), generator=gen)
        y = torch.randint(0, PROSE_VOCAB, (task.batch, task.context), generator=gen)
        for run in runs:
            t0 = time.perf_counter()
            out = run["model"](x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            t1 = time.perf_counter()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if it >= args.warmup:
                run["times"].append(time.perf_counter() - t0)
                run["steps"].append(time.perf_counter() - t1)
    first = statistics.fmean(runs[0]["times"])
    out = []
    for run in runs:
        mean = statistics.fmean(run["times"])
        step_mean, step_median = statistics.fmean(run["steps"]), statistics.median(run["steps"])
        out.append({"spec": run["spec"], "ms_per_iter": 1e3 * mean, "ratio_to_first": mean / first,
                    "step_ms_mean": 1e3 * step_mean, "step_ms_median": 1e3 * step_median})
        print(f"{run['spec']:<70} {1e3 * mean:8.1f} ms/iter  {mean / first:5.3f}x   "
              f"optimizer step: mean {1e3 * step_mean:6.1f} ms, median {1e3 * step_median:6.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"task": args.task, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                       "torch": torch.__version__, "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
