"""Time to Muon's and AdamW's final held-out loss from recorded runs and interleaved step times.

The runs' own ms/step are not comparable when several runs shared the cores, so time to a target is
each seed's steps ratio (steps to the reference's final held-out loss of that seed, over the
reference's steps: ``cgfac_bench.lm.reach``) times the step-time ratio measured interleaved by
``scripts/lm_step_time.py``. Usage::

    python scripts/lm_time_to_target.py RUNS.jsonl SPEED.json \\
        "tkfac-ortho-input:rows=128,factor_every=10,eig_every=10,rank=256,ns_steps=4"

A spec is ``optimizer:hyper`` as in ``lm_step_time.py``: it selects the runs whose hyperparameters
are these and the speed entry of the same optimizer and hyperparameters (an absent ``ns_steps`` is
TransformerKFAC's default, 5; the references are ``muon-f32`` as torch.optim.Muon computes it and ``adamw``).
``RUNS_SPEC@SPEED_SPEC`` rates the runs of one spec with the step time of another: the same
direction computed another way (round 8: runs made with the plain Newton–Schulz form, timed in the
Gram form, ``ns_form=gram``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from cgfac_bench.lm import parse_lm_hyper, reach

DEFAULTS = {"ns_steps": 5}  # TransformerKFAC's defaults that a spec may or may not spell out


def _key(name: str, hyper: dict[str, Any]) -> tuple[str, str]:
    return name, json.dumps({**DEFAULTS, **hyper}, sort_keys=True)


def _spec_key(spec: str) -> tuple[str, str]:
    name, _, hyper_text = spec.partition(":")
    return _key(name, parse_lm_hyper(hyper_text or None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="a runs.jsonl (recorded runs of cgfac-bench train)")
    parser.add_argument("speed", help="the --json of scripts/lm_step_time.py")
    parser.add_argument("specs", nargs="+", help="optimizer:hyper of the runs to rate")
    args = parser.parse_args()
    runs = [json.loads(line) for line in open(args.runs) if line.strip()]
    speed = {_spec_key(r["spec"]): r["ms_per_iter"] for r in json.load(open(args.speed))["results"]}
    refs = {name: {r["seed"]: r for r in runs if r["optimizer"] == name and _reference(r.get("hyper") or {})}
            for name in ("muon-f32", "adamw")}
    for spec in args.specs:
        runs_spec, _, speed_spec = spec.partition("@")
        key, speed_key = _spec_key(runs_spec), _spec_key(speed_spec or runs_spec)
        mine = sorted((r for r in runs if _key(r["optimizer"], r.get("hyper") or {}) == key), key=lambda r: r["seed"])
        print(f"{spec}: seeds {[r['seed'] for r in mine]}, final held-out "
              f"{_spread([r['final_heldout'] for r in mine])}")
        for ref_name, ref_runs in refs.items():
            step_ratio = speed[speed_key] / speed[_spec_key(ref_name)]
            steps: list[float | None] = []
            for r in mine:
                base = ref_runs.get(r["seed"])
                hit = None if base is None else reach(r, base["heldout_curve"][-1][2])
                steps.append(None if hit is None or base is None else hit[0] / base["steps"])
            times = [None if s is None else s * step_ratio for s in steps]
            print(f"  to {ref_name}'s final: steps {_spread(steps)}, step time {step_ratio:.3f}x, "
                  f"time {_spread(times)}")
            gram_key = _key(ref_name, {"ns_form": "gram"})
            if gram_key in speed:  # the same Muon computed in the Gram form: what Muon itself could save
                ratio = speed[speed_key] / speed[gram_key]
                print(f"    against {ref_name} in the Gram form: step time {ratio:.3f}x, "
                      f"time {_spread([None if s is None else s * ratio for s in steps])}")


def _reference(hyper: dict[str, Any]) -> bool:
    """Whether a run is a reference: Muon's update as torch.optim.Muon computes it (five iterations of
    Jordan's quintic, plain form); factor keys a Muon run may carry (``rows``, ``rank``, ...) do nothing."""
    return (hyper.get("ns_steps", 5) == 5 and hyper.get("ns_schedule", "jordan") == "jordan"
            and hyper.get("ns_form", "plain") == "plain")


def _spread(values: list[Any]) -> str:
    """``median [min, max]``, an unreached target counting as +inf."""
    vals = [float("inf") if v is None else v for v in values]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


if __name__ == "__main__":
    main()
