#!/usr/bin/env bash
# Set up .venv if needed, lint, type-check (mypy, settings in pyproject.toml), check the import contracts
# (lint-imports, [tool.importlinter] in pyproject.toml), run the test suite (with tests/docs: the
# README's and the docs' code, every script of examples/, an API entry for every public name), build
# the documentation site with warnings as errors (mkdocs.yml), then build the sdist and wheel and
# smoke-test the wheel in a fresh virtual environment (scripts/check_wheel.sh). Each step's seconds
# are printed at the end. The tests run on two pytest-xdist workers (one torch thread each, tests/conftest.py):
# most of the suite's time is spent in subprocesses (examples, torchrun launches) that overlap well.
set -euo pipefail
cd "$(dirname "$0")/.."
TIMES=""
timed() {
  local start=$SECONDS
  "$@"
  TIMES="$TIMES  $(( SECONDS - start )) s  ${*:1:3}"$'\n'
}
timed bash scripts/setup.sh
timed .venv/bin/python -m ruff check src tests examples docs
timed .venv/bin/python -m mypy
timed .venv/bin/lint-imports
timed .venv/bin/python -m pytest -q -n "${CGFAC_TEST_WORKERS:-2}" "$@"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/cgfac-site.XXXXXX")
export NO_MKDOCS_2_WARNING=1  # mkdocs-material's notice about MkDocs 2.0
timed .venv/bin/python -m mkdocs build --strict --quiet --site-dir "$SITE"
rm -rf "$SITE"
timed bash scripts/check_wheel.sh
printf 'scripts/test.sh, seconds per step:\n%s' "$TIMES"
