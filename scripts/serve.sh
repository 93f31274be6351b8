#!/usr/bin/env bash
# Set everything up and serve the default model at http://127.0.0.1:8000.
# With no checkpoint yet, train the default model first (a progress bar shows; about 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ckpt="${CONVSERVE_CHECKPOINT:-runs/default/model.safetensors}"
if [ ! -f "$ckpt" ]; then
  echo "No checkpoint at $ckpt: training the default model (shapes data, convnet) first."
  .venv/bin/python -m training train --out "$(dirname "$ckpt")"
fi
exec .venv/bin/python -m service --checkpoint "$ckpt" \
  --host "${CONVSERVE_HOST:-127.0.0.1}" --port "${CONVSERVE_PORT:-8000}" "$@"
