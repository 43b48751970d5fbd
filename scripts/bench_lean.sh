#!/usr/bin/env bash
# The lean step's two switches side by side on this machine, each pair in one run of this script:
#   1. run.keep_compute_copies in bf16 (tiny.yaml, 4 micro-batches a step, one process): the weights
#      cast once per update and kept, against a cast at every use; step time, peak allocated bytes,
#      and the loss after the timed steps (the same run either way);
#   2. parallel.overlap_grad_reduce at world 2 (store backend, zero 0, 0.05 MiB buckets): buckets
#      reduced during backward against after it; step time, buckets launched during backward, loss.
#      The store backend runs each collective when it is launched, so the CPU shows the bookkeeping's
#      cost, not a gain: the gain needs NCCL's own stream (scripts/gpu_check.sh on two GPUs).
# Usage: scripts/bench_lean.sh [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=4
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; shift 2; fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-lean
mkdir -p "$out"
common=(--config configs/tiny.yaml --set train.global_batch_size=16 --set train.micro_batch_size=4 --set train.grad_accum=0 --warmup 1
        --steps "$steps" --json)
bench() {  # name, world, extra arguments: rank 0's JSON into $out/name.json
  local name="$1" world="$2"
  shift 2
  echo "bench_lean: $name ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$world" -- build/moetrain bench-step "${common[@]}" "$@" \
    > "$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
  grep '{' "$out/$name.log" | tail -1 | sed 's/^\[rank 0\] //' > "$out/$name.json"
}
bench copies-kept 1 --set run.dtype=bf16 --set run.keep_compute_copies=true --set run.threads=2
bench copies-per-use 1 --set run.dtype=bf16 --set run.keep_compute_copies=false --set run.threads=2
bench overlap-off 2 --set parallel.overlap_grad_reduce=false --set parallel.grad_bucket_mb=0.05 --set run.threads=1
bench overlap-on 2 --set parallel.overlap_grad_reduce=true --set parallel.grad_bucket_mb=0.05 --set run.threads=1
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
j = {n: json.load(open(f"{out}/{n}.json")) for n in ("copies-kept", "copies-per-use", "overlap-off", "overlap-on")}
print(f"{'bf16 weights':<16} {'step ms':>8} {'peak MiB':>9} {'last loss':>10}")
for n, label in (("copies-per-use", "cast per use"), ("copies-kept", "kept copies")):
    print(f"{label:<16} {1e3 * j[n]['step_s_mean']:>8.1f} {j[n]['peak_allocated_bytes'] / 2**20:>9.1f} {j[n]['last_loss']:>10.5f}")
print(f"kept / per use: step {j['copies-kept']['step_s_mean'] / j['copies-per-use']['step_s_mean']:.3f}, "
      f"same loss: {j['copies-kept']['last_loss'] == j['copies-per-use']['last_loss']}")
print()
print(f"{'world 2 reduce':<16} {'step ms':>8} {'buckets':>8} {'during bwd':>10} {'last loss':>10}")
for n, label in (("overlap-off", "after backward"), ("overlap-on", "during backward")):
    print(f"{label:<16} {1e3 * j[n]['step_s_mean']:>8.1f} {j[n]['grad_buckets']:>8} {j[n]['grad_buckets_overlapped']:>10} "
          f"{j[n]['last_loss']:>10.5f}")
print(f"during / after: step {j['overlap-on']['step_s_mean'] / j['overlap-off']['step_s_mean']:.3f}, "
      f"same loss: {j['overlap-on']['last_loss'] == j['overlap-off']['last_loss']}")
PY
