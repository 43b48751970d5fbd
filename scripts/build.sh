#!/usr/bin/env bash
# Configures and builds moetrain into build/ (Release, Ninja, ccache when present): every target, or
# only those named with --target (scripts/quickstart.sh builds `moetrain` alone, not the tests).
# Other arguments go to the CMake configure step, e.g. -DMOETRAIN_BUILD_TESTS=OFF.
#
#   scripts/build.sh [--target NAME]... [CMake configure arguments...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
targets=()
configure=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) [[ $# -ge 2 ]] || { echo "[build] --target expects a target name" >&2; exit 2; }; targets+=("$2"); shift 2 ;;
    --target=*) targets+=("${1#*=}"); shift ;;
    *) configure+=("$1"); shift ;;
  esac
done
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
jobs="${MOETRAIN_JOBS:-$(nproc)}"
start=$(date +%s)
mkdir -p build
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${configure[@]}" > build/configure.log 2>&1 \
  || { cat build/configure.log >&2; echo "[build] CMake configure failed (log above)" >&2; exit 1; }
build_args=()
for t in "${targets[@]}"; do build_args+=(--target "$t"); done
cmake --build build -j "$jobs" "${build_args[@]}"
echo "[build] ${targets[*]:-every target} done in $(( $(date +%s) - start ))s: build/moetrain"
