#!/usr/bin/env bash
# ZeRO-1 on this machine: bench-step at world 1, 2 and 4 (store backend on the CPU, ep 1, the same
# global batch) with parallel.zero 0 and 1, in fp32 and (world 2 and 4) in bf16, where zero 1 also
# shards the fp32 master weights and holds the matmul weights in bf16. For each: the optimizer state
# one rank holds (moments, and masters) beside the analytic figure (8 bytes per parameter, 12 with
# masters, divided by the world at zero 1), rank 0's peak of allocated bytes and of resident memory,
# the step time and the loss after the timed steps (zero 0 and 1 train the same run).
# The model is tiny.yaml widened so that the weights and AdamW's state (~45M parameters) dominate.
# Usage: scripts/bench_zero.sh [--steps N] [extra --set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; shift 2; fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-zero
mkdir -p "$out"
wide=(--set model.d_model=512 --set model.moe.expert_hidden=1024 --set model.dense_hidden=2048
      --set model.moe.shared_hidden=1024 --set data.seq_len=64 --set train.global_batch_size=8 --set run.threads=1)
runs=("1 0 fp32" "2 0 fp32" "2 1 fp32" "4 0 fp32" "4 1 fp32" "2 0 bf16" "2 1 bf16" "4 0 bf16" "4 1 bf16")
for run in "${runs[@]}"; do
  read -r world zero dtype <<< "$run"
  name="w$world-zero$zero-$dtype"
  echo "bench_zero: world $world, zero $zero, $dtype ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$world" -- build/moetrain bench-step --config configs/tiny.yaml \
    "${wide[@]}" --set parallel.zero="$zero" --set run.dtype="$dtype" --warmup 1 --steps "$steps" --json "$@" \
    > "$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
  grep '^\[rank 0\] {' "$out/$name.log" | sed 's/^\[rank 0\] //' > "$out/$name.json"
done
python3 - "$out" "${runs[@]}" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'world':>5} {'zero':>4} {'dtype':>5} {'state MiB/rank':>15} {'analytic MiB':>13} {'ratio':>6} "
      f"{'peak alloc MiB':>15} {'peak RSS MiB':>13} {'step ms':>8} {'last loss':>10}")
for run in sys.argv[2:]:
    world, zero, dtype = run.split()
    world, zero = int(world), int(zero)
    j = json.load(open(f"{out}/w{world}-zero{zero}-{dtype}.json"))
    per_param = 8 + (4 if zero and dtype == "bf16" and world > 1 else 0)
    analytic = per_param * j["params_total"] / (world if zero else 1)
    got = j["optimizer_state_bytes"]
    print(f"{world:>5} {zero:>4} {dtype:>5} {got / 2**20:>15.1f} {analytic / 2**20:>13.1f} {got / analytic:>6.3f} "
          f"{j['peak_allocated_bytes'] / 2**20:>15.1f} {j['peak_rss_bytes'] / 2**20:>13.1f} "
          f"{1e3 * j['step_s_mean']:>8.1f} {j['last_loss']:>10.5f}")
print("(ep 1: every parameter is replicated over the world. State: AdamW's moments, and at zero 1 in bf16 the\n"
      " fp32 masters of the matmul weights (norm, router and embedding weights stay whole fp32 parameters, so\n"
      " the ratio there is below 1; above 1 is each bucket's padding to a multiple of the world). Peak\n"
      " allocated: LibTorch's CPU allocations, what `moetrain plan` predicts; peak RSS adds LibTorch itself.)")
PY
