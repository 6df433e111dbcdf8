#!/usr/bin/env bash
# Every committed benchmark result, in the order they were made (2-core CPU machine, nothing else
# running). Each command writes JSON + Markdown (+ PNG) into benchmarks/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/cgfac-bench
# The main job, as `bash scripts/bench.sh` runs it (defaults: MNIST autoencoder, 40 s per run).
$B train --out benchmarks/train-autoencoder
# Claim 3 (warm-started CG needs 10-20 iterations), with the task's true Fisher and the empirical one.
$B cg-iters --out benchmarks/cg-iters-autoencoder
$B cg-iters --fisher empirical --out benchmarks/cg-iters-autoencoder-empirical
# The automatic method choice against every candidate, on every layer of the benchmark models.
$B choice --out benchmarks/choice
# Claims 1 and 2: one layer's cost against width (a method's larger widths are skipped, and the
# skip recorded, once one call of it takes over 5 s: the session had no time for slower points).
$B layer --repeats 3 --warm-steps 5 --time-budget 5 --max-seconds-per-method 5 --out benchmarks/layer
# The 300 s autoencoder target: CG-FAC against Adam and SGD at their best grid learning rates.
lrs=$(.venv/bin/python - <<'PY'
import json
r = json.load(open("benchmarks/train-autoencoder/results.json"))
best = {n: r["runs"][i]["lr"] for n, i in r["best"].items()}
print(";".join(f"{n}={best[n]}" for n in ("cgfac-kron", "adam", "sgd") if n in best))
PY
)
$B train --budget 300 --optimizers cgfac-kron,adam,sgd --lr-grid "$lrs" --out benchmarks/train-autoencoder-300s
