#!/usr/bin/env bash
# Everything on a fresh machine: set-up, build, every test through CTest, then CTest's summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j "${MOETRAIN_TEST_JOBS:-$(nproc)}" --timeout 1200 "$@" 2>&1 | tee ctest.log
