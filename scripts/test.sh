#!/usr/bin/env bash
# The test command from the README (two workers: this machine has 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m pytest -q -n 2 -p no:benchmark -p no:cacheprovider "$@"
