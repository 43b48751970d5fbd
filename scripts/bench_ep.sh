#!/usr/bin/env bash
# Expert parallelism on this machine: for ep = 1, 2, 4 (world = ep, store backend on the CPU, the same
# global batch), the step time and the bytes each rank sent by all-to-all per step, next to the
# analytic count for uniform routing when every (token, expert) copy crossed on its own:
#   tokens per rank x top_k x d_model x 4 bytes x (ep-1)/ep per exchange, times 4 exchanges per MoE
#   layer and micro-batch (rows out and results back, forward and backward).
# Rows now cross once per (token, destination rank), so the measured bytes fall below that count. A
# second table, at ep 4 with 16 experts and top_k 4, puts node-limited routing
# (model.moe.router.max_groups_per_token off, 1, 2) beside the prediction for one row per (token,
# rank): tokens x distinct other ranks per token x d_model x 4 bytes x 4 exchanges, plus each copy's
# index and weight (16 bytes) and the sizes, and beside the old per-copy count.
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
bench() {  # bench NAME EP [--set ...]
  local name="$1" ep="$2"
  shift 2
  echo "bench_ep: $name ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$ep" -- build/moetrain bench-step --config configs/tiny.yaml \
    --set parallel.expert_parallel="$ep" --set train.global_batch_size=$global_batch --set run.threads=1 \
    --warmup 2 --steps "$steps" --json "$@" > "$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
  grep '^\[rank 0\] {' "$out/$name.log" | sed 's/^\[rank 0\] //' > "$out/$name.json"
}
for ep in 1 2 4; do bench "ep$ep" "$ep" "$@"; done
for groups in 0 1 2; do
  bench "ep4-m$groups" 4 --set model.moe.n_experts=16 --set model.moe.top_k=4 \
    --set model.moe.router.max_groups_per_token=$groups "$@"
done
python3 - "$out" <<'PY'
import json, sys
from math import comb
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
print("(analytic: one row per (token, expert) copy, as before rows were sent once per (token, rank); measured"
      " includes the size exchange and each copy's index and weight; a ratio below 1 is that saving plus"
      " rows that stay on their own rank; above 1, routing imbalance)")
print()
print("ep 4, 16 experts, top_k 4: all-to-all bytes per rank per step by model.moe.router.max_groups_per_token")
print(f"{'M':>4} {'step ms':>9} {'ranks/token':>11} {'a2a MB/step/rank':>17} {'predicted MB':>13} {'ratio':>6} "
      f"{'per-copy MB':>12} {'vs per-copy':>11}")
for groups in (0, 1, 2):
    j = json.load(open(f"{out}/ep4-m{groups}.json"))
    P, E, K, D = j["expert_parallel"], j["n_experts"], j["top_k"], j["d_model"]
    EL = E // P
    tokens = j["micro_batch_size"] * j["seq_len"]
    calls = j["moe_layers"] * j["grad_accum"]  # MoE layer calls per step
    # Distinct ranks a token's K experts lie on: uniform over all experts, or (node-limited) at most M.
    ranks = P * (1 - comb(E - EL, K) / comb(E, K)) if groups == 0 else min(groups, K)
    other = (P - 1) / P  # the share of them that is not this rank
    rows = tokens * ranks * other * D * 4 * 4  # rows out and back, forward and backward
    copies = tokens * K * other * (8 + 4 + 4)  # a copy's row index once, its weight forward and backward
    sizes = (P - 1) * (EL + 1) * 8
    predicted = (rows + copies + sizes) * calls
    per_copy = (tokens * K * other * D * 4 * 4 + (P - 1) * EL * 8) * calls
    measured = j["all_to_all_bytes_per_step"]
    name = "off" if groups == 0 else str(groups)
    print(f"{name:>4} {1e3 * j['step_s_mean']:>9.1f} {ranks:>11.2f} {measured / 1e6:>17.3f} {predicted / 1e6:>13.3f} "
          f"{measured / predicted:>6.3f} {per_copy / 1e6:>12.3f} {measured / per_copy:>11.3f}")
print("(predicted: uniform routing; off = P (1 - C(E - E/P, K) / C(E, K)) distinct ranks per token, M = at most M;"
      " per-copy: every (token, expert) copy's row crossing on its own, the exchange before this change)")
PY
