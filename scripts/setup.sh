#!/usr/bin/env bash
# Create .venv and install difflab into it. Usage: bash scripts/setup.sh [dev]
#
# PyTorch: if .venv already has torch (e.g. a CUDA build you installed), it is kept. Otherwise
# torch==2.13.0 is installed first; on this project's CPU-only machines that pin is served
# as the CPU build, so no CUDA packages are pulled. Set DIFFLAB_TORCH to another pip
# requirement (e.g. "torch==2.13.0+cu128 --index-url <your CUDA wheel index>") to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  $VPIP install --quiet ${DIFFLAB_TORCH:-torch==2.13.0}
fi
if [ "${1:-}" = "dev" ]; then
  $VPIP install --quiet -e ".[dev,text]"  # text: the tests run the real text encoder
else
  $VPIP install --quiet -e .
fi
.venv/bin/python -c "import torch, difflab; print(f'difflab {difflab.__version__} ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
