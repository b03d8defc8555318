#!/usr/bin/env bash
# The test command from the README: two workers (this machine has 2 cores), one BLAS/OpenMP thread each.
# (Two workers with two threads each oversubscribe the cores and made the suite 12x slower.)
#   bash scripts/test.sh          the full suite, as CI runs it
#   bash scripts/test.sh --fast   the edit loop: tests not marked `full` (trainer runs, the toy world's chain,
#                                 the benchmarks' smoke runs, wheels) -- every method through the shared checks
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
tier=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  tier=(-m "not full")
fi
exec "${PYTHON:-python3}" -m pytest -q -n 2 -p no:benchmark -p no:cacheprovider "${tier[@]}" "$@"
