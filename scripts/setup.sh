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
# --no-compile: Python compiles a module the first time it is imported, so byte-compiling every
# installed file up front (torch's and the test dependencies' thousands) only slows the install
# (96 s -> 51 s for torch and .[dev,text] here)
VPIP_INSTALL=".venv/bin/python -m pip install --quiet --no-compile"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  $VPIP_INSTALL ${DIFFLAB_TORCH:-torch==2.13.0}
fi
# dev: the web app's browser tests (tests/test_serve_browser.py) drive Debian's Chromium through
# its chromedriver. Installed when missing and this machine allows it (root with apt-get); never
# fails the set-up: without them those tests are skipped, saying why.
install_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no chromium/chromedriver and no root apt-get to install them: the browser tests will be skipped"
    return 0
  fi
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
           >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 \
              && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
                 >/dev/null 2>&1; }; }; then
    echo "setup: could not install chromium and chromium-driver with apt-get: the browser tests will be skipped"
  fi
  return 0
}
if [ "${1:-}" = "dev" ]; then
  $VPIP_INSTALL -e ".[dev,text]"  # text: the tests run the real text encoder
  install_browser
else
  $VPIP_INSTALL -e .
fi
.venv/bin/python -c "import torch, difflab; print(f'difflab {difflab.__version__} ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
