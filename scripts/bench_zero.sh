#!/usr/bin/env bash
# ZeRO-1 on this machine: bench-step at world 1, 2 and 4 (store backend on the CPU, ep 1, the same
# global batch) with parallel.zero 0 and 1. For each: the AdamW state one rank holds beside the
# analytic figure (8 bytes per parameter at zero 0, divided by the world at zero 1), rank 0's peak
# resident memory, the step time and the loss after the timed steps (the same run either way).
# The model is tiny.yaml widened so that AdamW's state (~45M parameters, 360 MB) dominates.
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
for run in "1 0" "2 0" "2 1" "4 0" "4 1"; do
  read -r world zero <<< "$run"
  echo "bench_zero: world $world, zero $zero ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$world" -- build/moetrain bench-step --config configs/tiny.yaml \
    "${wide[@]}" --set parallel.zero="$zero" --warmup 1 --steps "$steps" --json "$@" \
    > "$out/w$world-zero$zero.log" 2>&1 || { cat "$out/w$world-zero$zero.log" >&2; exit 1; }
  grep '^\[rank 0\] {' "$out/w$world-zero$zero.log" | sed 's/^\[rank 0\] //' > "$out/w$world-zero$zero.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'world':>5} {'zero':>4} {'AdamW MiB/rank':>15} {'analytic MiB':>13} {'ratio':>6} {'peak RSS MiB':>13} "
      f"{'step ms':>8} {'last loss':>10}")
for world, zero in ((1, 0), (2, 0), (2, 1), (4, 0), (4, 1)):
    j = json.load(open(f"{out}/w{world}-zero{zero}.json"))
    analytic = 8 * j["params_total"] / (world if zero else 1)
    got = j["optimizer_state_bytes"]
    print(f"{world:>5} {zero:>4} {got / 2**20:>15.1f} {analytic / 2**20:>13.1f} {got / analytic:>6.3f} "
          f"{j['peak_rss_bytes'] / 2**20:>13.1f} {1e3 * j['step_s_mean']:>8.1f} {j['last_loss']:>10.5f}")
print("(ep 1: every parameter is replicated over the world; a ratio above 1 is the padding of each bucket to a"
      " multiple of the world size. Peak RSS includes LibTorch itself and the store backend's buffers.)")
PY
