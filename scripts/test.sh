#!/usr/bin/env bash
# Everything on a fresh machine: set-up, build, every test through CTest, then CTest's summary.
# With MOETRAIN_FUZZ_SANITIZE=1 (the default where CI=true) it then builds the fuzz targets with
# libFuzzer, ASan and UBSan and runs each for MOETRAIN_FUZZ_SECONDS (default 10; scripts/fuzz.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh
fuzz_sanitize="${MOETRAIN_FUZZ_SANITIZE:-$([ "${CI:-}" = true ] && echo 1 || echo 0)}"
status=0
(cd build && ctest --output-on-failure -j "${MOETRAIN_TEST_JOBS:-$(nproc)}" --timeout 1200 "$@" 2>&1 | tee ctest.log) || status=$?
if [ "$fuzz_sanitize" = 1 ]; then
  bash scripts/fuzz.sh "${MOETRAIN_FUZZ_SECONDS:-10}" || status=1
fi
exit "$status"
