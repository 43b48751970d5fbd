#!/usr/bin/env bash
# Configures and builds moetrain into build/ (Release, Ninja, ccache when present).
# Extra arguments go to the CMake configure step, e.g. -DMOETRAIN_BUILD_TESTS=OFF.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
jobs="${MOETRAIN_JOBS:-$(nproc)}"
start=$(date +%s)
mkdir -p build
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" > build/configure.log 2>&1 \
  || { cat build/configure.log >&2; echo "[build] CMake configure failed (log above)" >&2; exit 1; }
cmake --build build -j "$jobs"
echo "[build] done in $(( $(date +%s) - start ))s: build/moetrain"
