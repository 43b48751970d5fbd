#!/usr/bin/env bash
# Expert parallelism on this machine: for ep = 1, 2, 4 (world = ep, store backend on the CPU, the same
# global batch), the step time and the bytes each rank sent by all-to-all per step, next to the
# analytic count for uniform routing:
#   tokens per rank x top_k x d_model x 4 bytes x (ep-1)/ep per exchange, times 4 exchanges per MoE
#   layer and micro-batch (rows out and results back, forward and backward).
# Usage: scripts/bench_ep.sh [--steps N] [extra --set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=5
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; shift 2; fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-ep
mkdir -p "$out"
# tiny.yaml with a global batch of 8 sequences of 256 tokens, split over the ranks.
global_batch=8
for ep in 1 2 4; do
  echo "bench_ep: ep $ep ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$ep" -- build/moetrain bench-step --config configs/tiny.yaml \
    --set parallel.expert_parallel="$ep" --set train.global_batch_size=$global_batch --set run.threads=1 \
    --warmup 2 --steps "$steps" --json "$@" > "$out/ep$ep.log" 2>&1 || { cat "$out/ep$ep.log" >&2; exit 1; }
  grep '^\[rank 0\] {' "$out/ep$ep.log" | sed 's/^\[rank 0\] //' > "$out/ep$ep.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'ep':>3} {'step ms':>9} {'tok/s':>8} {'a2a MB/step/rank':>17} {'analytic MB':>12} {'ratio':>6}")
for ep in (1, 2, 4):
    j = json.load(open(f"{out}/ep{ep}.json"))
    tokens = j["micro_batch_size"] * j["seq_len"]
    exchanges = 4 * j["moe_layers"] * j["grad_accum"]
    analytic = tokens * j["top_k"] * j["d_model"] * 4 * (ep - 1) / ep * exchanges
    measured = j["all_to_all_bytes_per_step"]
    ratio = f"{measured / analytic:.3f}" if analytic else "-"
    print(f"{ep:>3} {1e3 * j['step_s_mean']:>9.1f} {j['tokens_per_s']:>8.0f} {measured / 1e6:>17.3f} "
          f"{analytic / 1e6:>12.3f} {ratio:>6}")
print("(measured includes the per-expert count exchange, E/ep int64 per peer per MoE layer and micro-batch;"
      " a ratio off 1 is routing imbalance: rows that stay on their own rank are not sent)")
PY
