#!/usr/bin/env bash
# The test command from the README: two workers (this machine has 2 cores), one BLAS/OpenMP thread each.
# (Two workers with two threads each oversubscribe the cores and made the suite 12x slower.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "${PYTHON:-python3}" -m pytest -q -n 2 -p no:benchmark -p no:cacheprovider "$@"
