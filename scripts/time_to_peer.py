"""Per seed, when a run reaches its peer's final training loss (same seed), from a ``cgfac-bench train``
``results.json``: seconds and steps, interpolated along the evaluation curve, as ratios to the peer's.

``python scripts/time_to_peer.py RESULTS.json [OURS] [PEER]`` (defaults: cgfac-kron-adaptive, adam).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path


def reached(curve: Sequence[Sequence[float]], target: float, k: int) -> float | None:
    """Column ``k`` (0: seconds, 1: steps) where the curve first reaches ``target``, interpolated."""
    prev = None
    for row in curve:
        if row[2] <= target:
            if prev is None:
                return row[k]
            return prev[k] + (prev[2] - target) / (prev[2] - row[2]) * (row[k] - prev[k])
        prev = row
    return None


def main(argv: list[str]) -> int:
    runs = json.loads(Path(argv[1]).read_text())["runs"]
    ours = argv[2] if len(argv) > 2 else "cgfac-kron-adaptive"
    peer = argv[3] if len(argv) > 3 else "adam"
    times, steps = [], []
    for seed in sorted({r["seed"] for r in runs}):
        mine = next(r for r in runs if r["optimizer"] == ours and r["seed"] == seed)
        theirs = next(r for r in runs if r["optimizer"] == peer and r["seed"] == seed)
        end = theirs["curve"][-1]
        t, s = reached(mine["curve"], end[2], 0), reached(mine["curve"], end[2], 1)
        ratio = mine["ms_per_step"] / theirs["ms_per_step"]
        if t is None or s is None:
            print(f"seed {seed}: {peer}'s final {end[2]:.2f} not reached; step {ratio:.2f}x")
            continue
        times.append(t / end[0])
        steps.append(s / end[1])
        print(f"seed {seed}: {peer}'s final {end[2]:.2f} reached at {t:.1f} s ({times[-1]:.3f}x) and step "
              f"{s:.1f} ({steps[-1]:.3f}x); step {mine['ms_per_step']:.0f} against {theirs['ms_per_step']:.0f} ms "
              f"({ratio:.2f}x)")
    if times:
        print(f"median time ratio {statistics.median(times):.3f} [{min(times):.3f}, {max(times):.3f}], "
              f"steps {statistics.median(steps):.3f} [{min(steps):.3f}, {max(steps):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
