#!/usr/bin/env bash
# The GPU check, run on the GPU machine (no network; its own torch, nvcc, cmake, ninja): build against
# its torch with the carried Debian packages, run every test (the [gpu] ones included), then 50
# training steps of configs/tiny.yaml on CUDA in bf16 (and fp32 for comparison) and of
# configs/tiny-deepseek.yaml in bf16, and print a table.
# Needs third_party/gpu-debs (scripts/stage_gpu_deps.sh) and data/fortunes carried along.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
deps="$root/third_party/gpu-debs/root"
[ -d "$deps/usr/include/yaml-cpp" ] || { echo "[gpu_check] third_party/gpu-debs missing: run scripts/stage_gpu_deps.sh here and carry it" >&2; exit 1; }
[ -f data/fortunes/train.bin ] || { echo "[gpu_check] data/fortunes missing: carry it" >&2; exit 1; }
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export TORCH_CUDA_ARCH_LIST=9.0
torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix;$deps/usr" \
  > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error|FAILED" "$out/build.log" | head -30; exit 1; }
build_s=$(( $(date +%s) - t0 ))

t0=$(date +%s)
(cd build-gpu && ctest -j "$(nproc)" --timeout 600 --output-on-failure > "$out/ctest.log" 2>&1)
tests_s=$(( $(date +%s) - t0 ))
tests_line=$(grep -E "tests passed|tests failed" "$out/ctest.log" | tail -1)
build-gpu/moetrain_tests "[gpu]" --success 2>&1 | tail -5 > "$out/gpu-tests.txt"
gpu_line=$(grep -E "All tests passed|test cases" "$out/gpu-tests.txt" | tail -1)

run() {  # name dtype [config]
  build-gpu/moetrain train --config "${3:-configs/tiny.yaml}" --set run.device=cuda --set run.dtype="$2" \
    --set train.steps=50 --set optim.decay_steps=50 --set train.log_every=10 --set train.eval_every=50 \
    --set checkpoint.every=0 --set run.out_dir="runs/gpu-$1" > "$out/train-$1.log" 2>&1
  local rc=$?
  local done_line; done_line=$(grep "^done:" "$out/train-$1.log" | tail -1)
  printf '%-12s rc=%s  %s\n' "$1" "$rc" "${done_line:-$(tail -1 "$out/train-$1.log")}"
  return $rc
}
status=0
train_bf16=$(run bf16 bf16) || status=1
train_fp32=$(run fp32 fp32) || status=1
train_ds=$(run deepseek-bf16 bf16 configs/tiny-deepseek.yaml) || status=1
# The NCCL backend at world size 1 (two ranks cannot share one GPU), through the launcher.
scripts/launch.sh --nproc 1 -- build-gpu/moetrain train --config configs/tiny.yaml --set run.device=cuda \
  --set run.dtype=bf16 --set parallel.backend=nccl --set train.steps=50 --set optim.decay_steps=50 \
  --set train.log_every=10 --set train.eval_every=50 --set checkpoint.every=25 --set run.out_dir=runs/gpu-nccl \
  > "$out/train-nccl.log" 2>&1 && train_nccl=$(grep "done:" "$out/train-nccl.log" | tail -1) || { status=1; train_nccl="FAIL (see train-nccl.log)"; }
# A DeepSeek-V3-shaped stack (full widths, MLA, top-8 of experts of hidden 2048; 1 dense + 1 MoE layer
# with 32 routed experts so that fp32 weights and AdamW fit one GPU): measured tokens/s and MFU.
build-gpu/moetrain bench-step --config configs/deepseek-v3-671b.yaml --set run.device=cuda --set run.dtype=bf16 \
  --set cost.gpu=h200 --set model.n_layers=2 --set model.dense_layers=1 --set model.moe.n_experts=32 \
  --set model.mtp_depth=0 --set train.global_batch_size=1 --warmup 2 --steps 5 --json > "$out/bench-deepseek.json" \
  2> "$out/bench-deepseek.log" || status=1
bench_ds=$(python3 - "$out/bench-deepseek.json" <<'PY' 2>/dev/null || echo "FAIL (see bench-deepseek.log)"
import json, sys
j = json.load(open(sys.argv[1]))
print("%.0f tok/s, MFU %.3f, step %.0f ms" % (j["tokens_per_s"], j["mfu"], 1e3 * j["step_s_mean"]))
PY
)
grep -q "100% tests passed" "$out/ctest.log" || status=1
cp runs/gpu-bf16/metrics.jsonl "$out/metrics-bf16.jsonl" 2>/dev/null || true

echo
echo "== moetrain GPU check ($(cat "$out/gpu.txt")) =="
printf '%-22s %s\n' "build (from scratch)" "${build_s}s"
printf '%-22s %s\n' "ctest (all)" "${tests_line:-no summary} (${tests_s}s)"
printf '%-22s %s\n' "[gpu] cases" "${gpu_line:-see gpu-tests.txt}"
printf '%-22s %s\n' "train 50 steps bf16" "$train_bf16"
printf '%-22s %s\n' "train 50 steps fp32" "$train_fp32"
printf '%-22s %s\n' "tiny-deepseek bf16" "$train_ds"
printf '%-22s %s\n' "nccl world 1 bf16" "$train_nccl"
printf '%-22s %s\n' "bench DeepSeek-V3 2L" "$bench_ds"
grep -A30 "tests failed out of" "$out/ctest.log" | grep -E "^\s+[0-9]+ - " | head -10
echo "status: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
