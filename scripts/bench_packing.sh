#!/usr/bin/env bash
# The cost of packed documents on this machine: bench-step of configs/tiny.yaml and
# configs/tiny-deepseek.yaml (GQA and MLA) with data.packing stream (causal attention over the whole
# row) and documents (rows of synthetic documents of seq_len/8 to seq_len/2 tokens, positions
# restarting, attention within each document), at seq 256 and 1024, interleaved round by round so that
# load drifts hit both alike. On the CPU and in fp32 the packed path is SDPA with a block-diagonal
# causal mask; on CUDA in bf16 it is flash attention's variable-length kernel (scripts/gpu_check.sh
# measures that one).
#   step s      median over the rounds of bench-step's mean timed step, with the min-max spread
#   ratio       documents / stream, the median of the per-round ratios
#   peak MiB    the largest of the rounds' peak allocated bytes
# Usage: scripts/bench_packing.sh [--rounds N] [--steps N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds=3 steps=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    *) echo "bench_packing: unknown option '$1' (usage: scripts/bench_packing.sh [--rounds N] [--steps N])" >&2; exit 2 ;;
  esac
done
[[ -x build/moetrain ]] || bash scripts/build.sh --target moetrain
out=runs/bench-packing
rm -rf "$out"
mkdir -p "$out"
cases=()
for config in tiny tiny-deepseek; do
  for seq in 256 1024; do cases+=("$config $seq"); done
done
for round in $(seq 1 "$rounds"); do
  for case in "${cases[@]}"; do
    read -r config seq <<< "$case"
    for packing in stream documents; do
      name="$config-$seq-$packing-$round"
      echo "bench_packing: round $round/$rounds, $config seq $seq, $packing ..." >&2
      build/moetrain bench-step --config "configs/$config.yaml" --set data.packing="$packing" \
        --set data.seq_len="$seq" --set model.max_seq_len="$seq" --set train.global_batch_size=4 \
        --set train.grad_accum=1 --warmup 1 --steps "$steps" --json > "$out/$name.log" 2>&1 ||
        { cat "$out/$name.log" >&2; exit 1; }
      grep '^{' "$out/$name.log" | tail -1 > "$out/$name.json"
    done
  done
done
python3 - "$out" "$rounds" "${cases[@]}" <<'PY'
import json, statistics, sys
out, rounds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
load = lambda name: json.load(open(f"{out}/{name}.json"))
print(f"{'config':<14} {'seq':>5}  {'stream step s':>22}  {'documents step s':>22}  {'ratio':>6}  {'peak MiB s/d':>13}")
for case in cases:
    config, seq = case.split()
    runs = {p: [load(f"{config}-{seq}-{p}-{r}") for r in range(1, rounds + 1)] for p in ("stream", "documents")}
    step = {p: [j["step_s_mean"] for j in runs[p]] for p in runs}
    ratio = statistics.median(d / s for s, d in zip(step["stream"], step["documents"]))
    text = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
    peak = {p: max(j.get("peak_allocated_bytes", 0) for j in runs[p]) / 2**20 for p in runs}
    print(f"{config:<14} {seq:>5}  {text(step['stream']):>22}  {text(step['documents']):>22}  {ratio:>6.3f}  "
          f"{peak['stream']:>6.0f}/{peak['documents']:<6.0f}")
PY
