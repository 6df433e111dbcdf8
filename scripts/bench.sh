#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the training comparison on the MNIST deep
# autoencoder (tanh units, Glorot initialisation, batch 1000), each optimizer at its tuned settings
# (cgfac-bench train --tuned: K-FAC and CG-FAC from cgfac.optim, Adam, SGD, SOAP, Shampoo), 80 s of
# training each, about 10 minutes on two CPU cores. Extra arguments go to `cgfac-bench train`
# (the full grid: drop --tuned and give --lr-grid/--damping-grid; see benchmarks/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/cgfac-bench train --task autoencoder-tanh --tuned --budget 80 "$@"
