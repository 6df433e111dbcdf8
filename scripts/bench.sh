#!/usr/bin/env bash
# Set up .venv if needed, then run the main job, about 10 minutes on two CPU cores:
# 1. the MNIST deep autoencoder (tanh units, Glorot initialisation, batch 1000), each optimizer at its
#    tuned settings (cgfac-bench train --tuned: K-FAC and CG-FAC from cgfac.optim, Adam, SGD, SOAP,
#    Shampoo), 45 s of training each;
# 2. the same autoencoder with its hidden widths ×4 (784-4000-2000-1000-30-...: CG-FAC's regime,
#    wide layers), CG-FAC, Adam and K-FAC at their tuned settings, 60 s each.
# Extra arguments go to both `cgfac-bench train` runs (the full grids: see benchmarks/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/cgfac-bench train --task autoencoder-tanh --tuned --budget 45 "$@"
.venv/bin/cgfac-bench train --task autoencoder-wide --width-mult 4 --tuned --budget 60 --eval-samples 5000 \
  --optimizers cgfac-kron-adaptive,adam,kfac-adaptive "$@"
