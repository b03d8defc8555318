#!/usr/bin/env bash
# One-time set-up on a fresh machine: PyTorch first (this machine's CPU wheel is pinned so pip does not
# pull the CUDA build), then the library with its test extra, the trainer and the toy world (docs/architecture.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]" -e ./trainer -e ./toyworld
