#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the training comparison on its default task
# (the MNIST deep autoencoder). Extra arguments go to `cgfac-bench train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/cgfac-bench train "$@"
