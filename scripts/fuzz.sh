#!/usr/bin/env bash
# libFuzzer, AddressSanitizer and UBSan on every parser of untrusted bytes: builds the fuzz targets and
# the moetrain libraries they link with clang into build-fuzz/ (LibTorch itself is not instrumented),
# then runs each target for a number of seconds from the seeds in fuzz/corpus/<target>/. Prints the
# executions per target; exits 1 if any target crashed, leaked, hit UB or hung (the input is kept in
# build-fuzz/crashes/).
#   scripts/fuzz.sh [seconds-per-target] [target ...]    (default 10 s, every target)
# New inputs that reach new code accumulate in build-fuzz/corpus/<target>/ across runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-10}"
shift || true
all_targets=(safetensors shard loss_mask manifest hf_config hf_index config)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")

log() { printf '[fuzz] %s\n' "$*"; }

cxx="${MOETRAIN_FUZZ_CXX:-clang++}"
command -v "$cxx" >/dev/null 2>&1 || { echo "[fuzz] $cxx not found: install clang and libclang-rt-14-dev (scripts/setup.sh does)" >&2; exit 1; }
fuzzer_lib="$("$cxx" -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a"
[ -f "$fuzzer_lib" ] || { echo "[fuzz] $fuzzer_lib is missing: install libclang-rt-14-dev (libFuzzer and the sanitizers)" >&2; exit 1; }
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

# Every library gets coverage instrumentation and both sanitizers; UB aborts instead of printing.
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
start=$(date +%s)
mkdir -p build-fuzz
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="$flags" -DMOETRAIN_BUILD_TESTS=OFF -DMOETRAIN_BUILD_FUZZ=OFF -DMOETRAIN_LIBFUZZER=ON \
  > build-fuzz/configure.log 2>&1 || { cat build-fuzz/configure.log >&2; echo "[fuzz] CMake configure failed (log above)" >&2; exit 1; }
cmake --build build-fuzz -j "${MOETRAIN_JOBS:-$(nproc)}" --target $(printf 'fuzz_%s ' "${targets[@]}")
log "built in $(( $(date +%s) - start ))s"

# LibTorch is not built with ASan: its allocations are tracked through the interceptors, but leaks
# at exit and ODR reports across its shared objects are not ours.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_odr_violation=0:abort_on_error=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p build-fuzz/crashes
failed=()
summary=()
for t in "${targets[@]}"; do
  case "$t" in
    shard|loss_mask) dict=binary ;;
    config) dict=yaml ;;
    *) dict=json ;;
  esac
  mkdir -p "build-fuzz/corpus/$t"
  log "$t: ${seconds}s"
  if build-fuzz/fuzz/fuzz_"$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
      -print_final_stats=1 -dict="fuzz/dict/$dict.dict" -artifact_prefix="build-fuzz/crashes/$t-" \
      "build-fuzz/corpus/$t" "fuzz/corpus/$t" > "build-fuzz/fuzz_$t.log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
    tail -n 40 "build-fuzz/fuzz_$t.log" >&2
  fi
  runs="$(grep -o "stat::number_of_executed_units: *[0-9]*" "build-fuzz/fuzz_$t.log" | tail -n 1 | grep -o "[0-9]*$" || echo "?")"
  summary+=("$(printf '%-12s %10s executions in %ss  %s' "$t" "$runs" "$seconds" "$status")")
done
log "libFuzzer + ASan + UBSan, per target:"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "[fuzz] FAILED: ${failed[*]} (logs: build-fuzz/fuzz_<target>.log, inputs: build-fuzz/crashes/)" >&2
  exit 1
fi
