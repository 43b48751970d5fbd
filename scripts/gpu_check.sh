#!/usr/bin/env bash
# The GPU check, in two steps so that the build can happen before the GPU machine's clock starts:
#
#   scripts/gpu_check.sh build   configures and builds the CLI and the tests into build-gpu/ against
#                                this machine's torch (python3's, else third_party/venv's) and the
#                                carried Debian packages where present; build-gpu/ is what to carry
#   scripts/gpu_check.sh run     on the GPU machine (no network; its own torch): runs the checks below
#                                with build-gpu/'s binaries, meant to finish in under 8 minutes
#   scripts/gpu_check.sh         both, one after the other (the build then counts in the time)
#
# The binaries find LibTorch through LD_LIBRARY_PATH (the run step's torch), so a build made on
# another machine runs where the same torch version is installed. The run step prints one table of:
#   - the hidden [.gpu] test cases, every one of which must run and pass (none may be skipped);
#   - the [.gpu][multirank] cases apart: expert parallel, ZeRO-1, pipeline and MTP at world 2-4 on
#     this one GPU (run.device cuda over the store backend) against one process;
#   - 100 steps of configs/tiny.yaml on CUDA in bf16 and in fp32: the mean of the logged losses and
#     the final validation losses within 2% of each other, no single logged loss more than 10% off.
#     Calibrated on the CPU (tiny.yaml at seq 64, 8 sequences a step, 100 steps): 0.47%, 0.23% and
#     5.0% (single steps are single noisy batches, and the two runs' trajectories part after a while);
#   - run.deterministic: two 20-step bf16 runs, one straight and one stopped at step 10 and resumed,
#     whose losses must agree bit for bit; and the same pair without the key, for comparison;
#   - configs/tiny-deepseek.yaml in bf16, the NCCL backend at world size 1 through the launcher, and a
#     bench-step of a 2-layer DeepSeek-V3-shaped stack (tokens/s, MFU), whose measured peak of allocated
#     CUDA memory is printed beside `moetrain plan`'s prediction for the same config (bf16 and MLA
#     terms, unmeasured on the CPU: the issue asks for 15%);
#   - an OLMoE-1B-7B-shaped stack (4 layers, seq 4096, bf16): bench-step's tokens/s and MFU against
#     transformers' OlmoeForCausalLM trained the same way on the same GPU (scripts/bench_step_hf.py),
#     and the measured peak against plan's;
#   - host syncs per step of tiny-deepseek in bf16 as counted (common/host_sync.h) beside the
#     synchronising calls CUDA itself saw (c10's sync debug mode in warn);
#   - where the machine has two GPUs or more: bench-step at world 2 with the gradient reduction
#     overlapped with backward and not, the step times side by side.
# Set GPU_CHECK_CTEST=1 to run the whole CPU suite there as well (a few more minutes).
# Carry along: build-gpu/, data/fortunes, and third_party/gpu-debs (scripts/stage_gpu_deps.sh) where
# the GPU machine lacks the Debian packages (yaml-cpp ...). The tests that launch the CLI find it by the
# absolute path of the build: a build carried to another folder gets a link at that path (below).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step="${1:-all}"
case "$step" in build|run|all) ;; *) echo "usage: scripts/gpu_check.sh [build|run]" >&2; exit 2 ;; esac
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
deps="$root/third_party/gpu-debs/root"
[ -d "$deps/usr/lib/x86_64-linux-gnu" ] && export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export TORCH_CUDA_ARCH_LIST=9.0
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
python=python3
python3 -c 'import torch' 2>/dev/null || python="$root/third_party/venv/bin/python3"
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"

if [ "$step" != run ]; then
  t0=$(date +%s)
  prefix="$torch_prefix"
  [ -d "$deps/usr/include/yaml-cpp" ] && prefix="$torch_prefix;$deps/usr"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  cmake --build build-gpu -j "$(nproc)" --target moetrain moetrain_tests > "$out/build.log" 2>&1 ||
    { grep -E "error|FAILED" "$out/build.log" | head -30; exit 1; }
  echo $(( $(date +%s) - t0 )) > build-gpu/build_seconds
  echo "$root" > build-gpu/built_in
  echo "[gpu_check] built build-gpu/moetrain and build-gpu/moetrain_tests in $(cat build-gpu/build_seconds)s"
  [ "$step" = build ] && exit 0
fi

[ -x build-gpu/moetrain ] && [ -x build-gpu/moetrain_tests ] ||
  { echo "[gpu_check] build-gpu/ has no binaries: run scripts/gpu_check.sh build first (here, or carried along)" >&2; exit 1; }
[ -f data/fortunes/train.bin ] || { echo "[gpu_check] data/fortunes missing: carry it" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
build_s="$(cat build-gpu/build_seconds 2>/dev/null || echo '?')"
built_in="$(cat build-gpu/built_in 2>/dev/null || echo "$root")"
if [ "$built_in" != "$root" ] && [ ! -e "$built_in" ]; then  # built elsewhere: its paths must resolve here
  mkdir -p "$(dirname "$built_in")" 2>/dev/null && ln -s "$root" "$built_in" ||
    echo "[gpu_check] built in $built_in: cannot link it to $root, the cases that launch the CLI will fail"
fi
run_t0=$(date +%s)
status=0
fail() { status=1; echo "FAIL: $*"; }

# ---- the [.gpu] cases: listed, then run; every listed case must run and pass -------------------------
t0=$(date +%s)
expected=$(build-gpu/moetrain_tests "[gpu]~[multirank]" --list-test-names-only 2>/dev/null | grep -c . || true)
build-gpu/moetrain_tests "[gpu]~[multirank]" > "$out/gpu-tests.txt" 2>&1
gpu_rc=$?
summary=$(grep -E "All tests passed|test cases" "$out/gpu-tests.txt" | tail -1)
ran=$(sed -nE 's/.*\(([0-9]+) assertions? in ([0-9]+) test cases?\).*/\2/p; s/^test cases: *([0-9]+).*/\1/p' \
  <<< "$summary" | head -1)
gpu_s=$(( $(date +%s) - t0 ))
gpu_line="${summary:-no summary} (${gpu_s}s)"
[ "$gpu_rc" = 0 ] || fail "[.gpu] tests exit $gpu_rc (see gpu-tests.txt)"
[ "${expected:-0}" -gt 0 ] && [ "${ran:-0}" = "$expected" ] || fail "[.gpu] ran ${ran:-0} of ${expected:-0} listed cases"
# Several ranks on this one GPU over the store backend, against one process (tests/gpu/test_gpu_multirank.cpp).
t0=$(date +%s)
mr_expected=$(build-gpu/moetrain_tests "[multirank]" --list-test-names-only 2>/dev/null | grep -c . || true)
build-gpu/moetrain_tests "[multirank]" > "$out/gpu-multirank.txt" 2>&1
mr_rc=$?
mr_summary=$(grep -E "All tests passed|test cases" "$out/gpu-multirank.txt" | tail -1)
mr_line="${mr_summary:-no summary} ($(( $(date +%s) - t0 ))s), listed ${mr_expected:-0}"
[ "$mr_rc" = 0 ] || fail "[.gpu][multirank] tests exit $mr_rc (see gpu-multirank.txt)"
! grep -q "SKIPPED" "$out/gpu-multirank.txt" || fail "[.gpu][multirank] skipped: no CUDA device seen"
if [ "${GPU_CHECK_CTEST:-0}" = 1 ]; then
  (cd build-gpu && ctest -j "$(nproc)" --timeout 600 > "$out/ctest.log" 2>&1) || fail "ctest (see ctest.log)"
  ctest_line=$(grep -E "tests passed|tests failed" "$out/ctest.log" | tail -1)
fi

# ---- training runs --------------------------------------------------------------------------------
train() {  # name steps dtype [extra args...]: trains configs/tiny.yaml on CUDA into runs/gpu-<name>
  local name=$1 steps=$2 dtype=$3; shift 3
  build-gpu/moetrain train --config configs/tiny.yaml --set run.device=cuda --set run.dtype="$dtype" \
    --set train.steps="$steps" --set optim.decay_steps=100 --set train.log_every=10 --set train.eval_every=100 \
    --set checkpoint.every=0 --set run.out_dir="runs/gpu-$name" --set cost.gpu=h200 "$@" >> "$out/train-$name.log" 2>&1
}
losses() { python3 -c 'import json,sys; print(" ".join(repr(json.loads(l)["loss"]) for l in open(sys.argv[1])))' "$1"; }
rm -rf runs/gpu-*
train bf16 100 bf16 --overwrite || fail "train bf16 (see train-bf16.log)"
train fp32 100 fp32 --overwrite || fail "train fp32 (see train-fp32.log)"
bf16_vs_fp32=$(python3 - runs/gpu-bf16/metrics.jsonl runs/gpu-fp32/metrics.jsonl <<'PY' 2>&1
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
rel = lambda x, y: abs(x - y) / y
worst = max(rel(x["loss"], y["loss"]) for x, y in zip(a, b))
mean = rel(sum(x["loss"] for x in a) / len(a), sum(y["loss"] for y in b) / len(b))
va, vb = a[-1]["val_loss"], b[-1]["val_loss"]
ok = mean <= 0.02 and rel(va, vb) <= 0.02 and worst <= 0.10
print(f"{'ok' if ok else 'OUT OF BOUNDS'}: mean logged loss {100 * mean:.2f}% (bound 2%), val {va:.4f} vs {vb:.4f} "
      f"({100 * rel(va, vb):.2f}%, bound 2%), worst single step {100 * worst:.1f}% (bound 10%), "
      f"bf16 {a[-1]['tokens_per_s']:.0f} tok/s")
PY
)
[[ "$bf16_vs_fp32" == ok* ]] || fail "bf16 vs fp32: $bf16_vs_fp32"

det="--set run.deterministic=true --set checkpoint.every=10"
train det-straight 20 bf16 $det --overwrite || fail "deterministic run (see train-det-straight.log)"
train det-resumed 10 bf16 $det --overwrite && train det-resumed 20 bf16 $det --resume auto ||
  fail "deterministic resume (see train-det-resumed.log)"
train nondet-a 20 bf16 --overwrite && train nondet-b 20 bf16 --overwrite || fail "default-mode runs"
if [ -f runs/gpu-det-straight/metrics.jsonl ] && [ -f runs/gpu-det-resumed/metrics.jsonl ] &&
   [ "$(losses runs/gpu-det-straight/metrics.jsonl)" = "$(losses runs/gpu-det-resumed/metrics.jsonl)" ]; then
  det_line="bit-exact: straight = stopped at 10 and resumed, every logged loss"
else
  fail "run.deterministic: the resumed run's losses differ from the straight run's"
  det_line="DIFFER"
fi
if [ "$(losses runs/gpu-nondet-a/metrics.jsonl 2>/dev/null)" = "$(losses runs/gpu-nondet-b/metrics.jsonl 2>/dev/null)" ]; then
  nondet_line="two default-mode runs agreed bit for bit this time"
else
  nondet_line="two default-mode runs differ (expected: atomics)"
fi

build-gpu/moetrain train --config configs/tiny-deepseek.yaml --set run.device=cuda --set run.dtype=bf16 \
  --set train.steps=50 --set optim.decay_steps=50 --set train.eval_every=50 --set checkpoint.every=0 \
  --set run.out_dir=runs/gpu-deepseek --set cost.gpu=h200 > "$out/train-deepseek.log" 2>&1 || fail "tiny-deepseek"
ds_line=$(grep "^done:" "$out/train-deepseek.log" | tail -1 | cut -c1-150)
# The NCCL backend at world size 1 (two ranks cannot share one GPU), through the launcher.
scripts/launch.sh --nproc 1 -- build-gpu/moetrain train --config configs/tiny.yaml --set run.device=cuda \
  --set run.dtype=bf16 --set parallel.backend=nccl --set train.steps=30 --set optim.decay_steps=30 \
  --set train.eval_every=30 --set checkpoint.every=15 --set run.out_dir=runs/gpu-nccl --set cost.gpu=h200 \
  > "$out/train-nccl.log" 2>&1 || fail "nccl world 1 (see train-nccl.log)"
nccl_line=$(grep "done:" "$out/train-nccl.log" | tail -1 | cut -c1-150)
# A DeepSeek-V3-shaped stack (full widths, MLA, top-8 of experts of hidden 2048; 1 dense + 1 MoE layer
# with 32 routed experts so that fp32 weights and AdamW fit one GPU): measured tokens/s and MFU.
build-gpu/moetrain bench-step --config configs/deepseek-v3-671b.yaml --set run.device=cuda --set run.dtype=bf16 \
  --set cost.gpu=h200 --set model.n_layers=2 --set model.dense_layers=1 --set model.moe.n_experts=32 \
  --set model.mtp_depth=0 --set train.global_batch_size=1 --warmup 2 --steps 5 --json > "$out/bench-deepseek.json" \
  2> "$out/bench-deepseek.log" || fail "bench DeepSeek-V3 2L"
bench_line=$(python3 - "$out/bench-deepseek.json" <<'PY' 2>/dev/null || echo "FAIL (see bench-deepseek.log)"
import json, sys
j = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
print("%.0f tok/s, MFU %.3f, step %.0f ms" % (j["tokens_per_s"], j["mfu"], 1e3 * j["step_s_mean"]))
PY
)
build-gpu/moetrain plan --config configs/deepseek-v3-671b.yaml --set run.dtype=bf16 --set model.n_layers=2 \
  --set model.dense_layers=1 --set model.moe.n_experts=32 --set model.mtp_depth=0 --set train.global_batch_size=1 \
  --gpu h200 --json > "$out/plan-deepseek.json" 2> "$out/plan-deepseek.log" || fail "plan DeepSeek-V3 2L"
plan_line=$(python3 - "$out/plan-deepseek.json" "$out/bench-deepseek.json" <<'PY' 2>/dev/null || echo "FAIL (see plan-deepseek.log)"
import json, sys
plan = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
bench = json.loads([l for l in open(sys.argv[2]) if l.startswith("{")][-1])
p, m = plan["peak_bytes"], bench["peak_allocated_bytes"]
print("predicted %.2f GiB, measured %.2f GiB, ratio %.3f (%s)" % (p / 2**30, m / 2**30, p / m,
      "within 15%" if abs(p - m) <= 0.15 * m else "OFF by more than 15%"))
PY
)
# OLMoE-1B-7B's shape (4 of its 16 layers, so that both frameworks' fp32 weights and AdamW fit one
# GPU at seq 4096): moetrain's step against transformers' on this GPU, and plan's peak against ours.
olmoe=(--config configs/models/olmoe-1b-7b.yaml --set model.n_layers=4 --set train.global_batch_size=1)
build-gpu/moetrain bench-step "${olmoe[@]}" --set cost.gpu=h200 --warmup 2 --steps 5 --json \
  > "$out/bench-olmoe.json" 2> "$out/bench-olmoe.log" || fail "bench OLMoE-shaped"
python3 scripts/bench_step_hf.py --layers 4 --seq 4096 --steps 5 --warmup 2 > "$out/bench-olmoe-hf.json" \
  2> "$out/bench-olmoe-hf.log" || fail "bench OLMoE-shaped in transformers (see bench-olmoe-hf.log)"
build-gpu/moetrain plan "${olmoe[@]}" --gpu h200 --json > "$out/plan-olmoe.json" 2> "$out/plan-olmoe.log" ||
  fail "plan OLMoE-shaped"
olmoe_line=$(python3 - "$out/bench-olmoe.json" "$out/bench-olmoe-hf.json" "$out/plan-olmoe.json" <<'PY' 2>/dev/null || echo "FAIL (see bench-olmoe*.log)"
import json, sys
ours, hf, plan = (json.loads([l for l in open(f) if l.startswith("{")][-1]) for f in sys.argv[1:4])
p, m = plan["peak_bytes"], ours["peak_allocated_bytes"]
print("%.0f tok/s (MFU %.3f) vs transformers %.0f tok/s: %.2fx; peak %.1f GiB, plan %.1f GiB (%.3f)" % (
    ours["tokens_per_s"], ours["mfu"], hf["tokens_per_s"], ours["tokens_per_s"] / hf["tokens_per_s"],
    m / 2**30, p / 2**30, p / m))
PY
)
# bf16 weight copies kept between updates against a cast at every use (4 micro-batches a step).
for keep in false true; do
  build-gpu/moetrain bench-step --config configs/tiny-deepseek.yaml --set run.device=cuda --set run.dtype=bf16 \
    --set cost.gpu=h200 --set run.keep_compute_copies=$keep --set train.grad_accum=4 --warmup 3 --steps 10 --json \
    > "$out/bench-copies-$keep.json" 2> "$out/bench-copies-$keep.log" || fail "bench keep_compute_copies=$keep"
done
copies_line=$(python3 - "$out/bench-copies-false.json" "$out/bench-copies-true.json" <<'PY' 2>/dev/null || echo "FAIL (see bench-copies-*.log)"
import json, sys
per_use, kept = (json.loads([l for l in open(f) if l.startswith("{")][-1]) for f in sys.argv[1:3])
print("step %.1f ms cast per use, %.1f ms kept (%.3fx), peak %.2f / %.2f GiB, same loss: %s" % (
    1e3 * per_use["step_s_mean"], 1e3 * kept["step_s_mean"], kept["step_s_mean"] / per_use["step_s_mean"],
    per_use["peak_allocated_bytes"] / 2**30, kept["peak_allocated_bytes"] / 2**30, kept["last_loss"] == per_use["last_loss"]))
PY
)
# Packed documents (data.packing: documents; rows of documents of seq_len/8 to seq_len/2 tokens): the
# variable-length flash path against the causal stream, and the mask path (deterministic mode turns
# flash off) against the same, on OLMoE's shape.
for packing in stream documents; do
  for det in false true; do
    build-gpu/moetrain bench-step "${olmoe[@]}" --set cost.gpu=h200 --set run.dtype=bf16 --set data.packing=$packing \
      --set run.deterministic=$det --warmup 2 --steps 5 --json > "$out/bench-packing-$packing-$det.json" \
      2> "$out/bench-packing-$packing-$det.log" || fail "bench packing=$packing deterministic=$det"
  done
done
packing_line=$(python3 - "$out"/bench-packing-{stream,documents}-{false,true}.json <<'PY' 2>/dev/null || echo "FAIL (see bench-packing-*.log)"
import json, sys
s, sd, d, dd = (json.loads([l for l in open(f) if l.startswith("{")][-1]) for f in sys.argv[1:5])
print("varlen flash %.0f vs causal %.0f tok/s (%.3fx); masked %.0f vs causal %.0f tok/s in deterministic mode (%.3fx)" % (
    d["tokens_per_s"], s["tokens_per_s"], d["tokens_per_s"] / s["tokens_per_s"],
    dd["tokens_per_s"], sd["tokens_per_s"], dd["tokens_per_s"] / sd["tokens_per_s"]))
PY
)
# Host syncs: what the step's code path counts (host_syncs_per_step) beside the synchronising calls
# CUDA itself saw in the timed steps (c10's sync debug mode, one warning each).
MOETRAIN_CUDA_SYNC_DEBUG=1 build-gpu/moetrain bench-step --config configs/tiny-deepseek.yaml --set run.device=cuda \
  --set run.dtype=bf16 --set cost.gpu=h200 --set train.grad_accum=2 --warmup 2 --steps 3 --json \
  > "$out/bench-syncs.json" 2> "$out/bench-syncs.log" || fail "bench sync debug"
cuda_syncs=$(grep -c "synchronizing CUDA operation" "$out/bench-syncs.log" || true)
syncs_line=$(python3 - "$out/bench-syncs.json" "$cuda_syncs" <<'PY' 2>/dev/null || echo "FAIL (see bench-syncs.log)"
import json, sys
j = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
steps = j["steps"]
print("host syncs per step %.1f counted (%s), CUDA saw %.1f per step; ops per step %.0f" % (
    j["host_syncs_per_step"], json.dumps(j["host_syncs_by_reason"]), int(sys.argv[2]) / steps, j["ops_per_step"]))
PY
)
# Gradient reduction overlapped with backward needs two data-parallel ranks, so two GPUs: bench-step
# of tiny-deepseek at world 2 with overlap on and off, side by side, where the machine has them.
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$gpus" -ge 2 ]; then
  for overlap in false true; do
    scripts/launch.sh --nproc 2 -- build-gpu/moetrain bench-step --config configs/tiny-deepseek.yaml \
      --set run.device=cuda --set run.dtype=bf16 --set cost.gpu=h200 --set parallel.overlap_grad_reduce=$overlap \
      --set parallel.grad_bucket_mb=4 --warmup 3 --steps 10 --json > "$out/bench-overlap-$overlap.json" \
      2> "$out/bench-overlap-$overlap.log" || fail "bench overlap=$overlap"
  done
  overlap_line=$(python3 - "$out/bench-overlap-false.json" "$out/bench-overlap-true.json" <<'PY' 2>/dev/null || echo "FAIL (see bench-overlap-*.log)"
import json, sys
off, on = (json.loads([l for l in open(f) if "{" in l][-1].split("] ", 1)[-1]) for f in sys.argv[1:3])
print("step %.1f ms after backward, %.1f ms during (%d of %d buckets), gain %.3fx, same loss: %s" % (
    1e3 * off["step_s_mean"], 1e3 * on["step_s_mean"], on["grad_buckets_overlapped"], on["grad_buckets"],
    off["step_s_mean"] / on["step_s_mean"], on["last_loss"] == off["last_loss"]))
PY
)
else
  overlap_line="skipped: $gpus GPU (two data-parallel ranks need two)"
fi
cp runs/gpu-bf16/metrics.jsonl "$out/metrics-bf16.jsonl" 2>/dev/null || true
cp runs/gpu-fp32/metrics.jsonl "$out/metrics-fp32.jsonl" 2>/dev/null || true

echo
echo "== moetrain GPU check ($(cat "$out/gpu.txt")) =="
printf '%-24s %s\n' "build" "${build_s}s (scripts/gpu_check.sh build)"
printf '%-24s %s\n' "run step" "$(( $(date +%s) - run_t0 ))s (aim: under 480 s)"
printf '%-24s %s\n' "[.gpu] cases" "$gpu_line, listed ${expected:-0}"
printf '%-24s %s\n' "packed documents" "$packing_line"
printf '%-24s %s\n' "ranks on one GPU" "$mr_line"
[ -n "${ctest_line:-}" ] && printf '%-24s %s\n' "ctest (CPU suite)" "$ctest_line"
printf '%-24s %s\n' "bf16 vs fp32, 100 steps" "$bf16_vs_fp32"
printf '%-24s %s\n' "run.deterministic" "$det_line"
printf '%-24s %s\n' "default mode" "$nondet_line"
printf '%-24s %s\n' "tiny-deepseek bf16" "${ds_line:-FAIL}"
printf '%-24s %s\n' "nccl world 1 bf16" "${nccl_line:-FAIL}"
printf '%-24s %s\n' "bench DeepSeek-V3 2L" "$bench_line"
printf '%-24s %s\n' "plan vs measured peak" "$plan_line"
printf '%-24s %s\n' "OLMoE-shaped, 4 layers" "$olmoe_line"
printf '%-24s %s\n' "bf16 copies kept" "$copies_line"
printf '%-24s %s\n' "host syncs, tiny-ds" "$syncs_line"
printf '%-24s %s\n' "overlap, world 2" "$overlap_line"
echo "status: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
