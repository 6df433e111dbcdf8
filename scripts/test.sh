#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests
.venv/bin/python -m pytest -q "$@"
