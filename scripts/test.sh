#!/usr/bin/env bash
# Install difflab with its development dependencies in .venv, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check difflab tests benchmarks
.venv/bin/python -m pytest "$@"
