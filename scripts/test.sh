#!/usr/bin/env bash
# Install difflab with its development dependencies in .venv, lint, and run the test suite.
# The tests run on every core (pytest-xdist, at most 4 workers, one test file per worker at a
# time); DIFFLAB_TEST_WORKERS=0 runs them in this one process (e.g. for `-m slow`, whose
# multi-process and timing tests want the machine to themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check difflab tests benchmarks
.venv/bin/python -m pytest -n "${DIFFLAB_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile "$@"
