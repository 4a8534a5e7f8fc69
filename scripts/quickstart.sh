#!/usr/bin/env bash
# Fresh machine to sample grid in one command: install, train the default model on the
# built-in digits (class-conditional), then sample a grid of every class.
# Extra arguments go to `difflab train` (e.g. --steps 500 for a quicker look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=runs/digits
.venv/bin/difflab train --out-dir "$OUT" "$@"
.venv/bin/difflab sample --checkpoint "$OUT" --class all --n 100 --out "$OUT/grid.png" \
  --save-npz "$OUT/samples.npz"
echo "done: sample grid of every class (one row per digit) at $OUT/grid.png"
