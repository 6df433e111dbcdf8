#!/usr/bin/env bash
# Set up .venv if needed, lint, type-check (mypy, settings in pyproject.toml), check the import contracts
# (lint-imports, [tool.importlinter] in pyproject.toml), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests
.venv/bin/python -m mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
