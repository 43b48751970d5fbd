#!/usr/bin/env bash
# Full fine-tuning against LoRA on one model: bench-step of Qwen3-30B-A3B's shape cut to about 220M
# parameters (configs/models/qwen3-30b-a3b.yaml with 2 layers, 16 routed experts of top-8 and an
# 8192-token vocabulary; widths, heads and expert hidden as published), fp32 on this CPU, seq 256,
# 2 sequences a step: every weight trained (AdamW state for all) against train.lora rank 16 on every
# target (frozen base, fp32 adapters), interleaved round by round so that load drifts hit both alike.
#   step s      median over the rounds of bench-step's mean timed step, with the min-max spread
#   peak MiB    the largest of the rounds' peak allocated bytes (weights, gradients, optimizer state,
#               activations: bench-step's meter from the model's build on)
#   ratio       LoRA / full, per round, median
# Usage: scripts/bench_lora.sh [--rounds N] [--steps N] [--set KEY=VALUE]...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds=3 steps=2 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    --set) extra+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    *) echo "bench_lora: unknown option '$1' (usage: scripts/bench_lora.sh [--rounds N] [--steps N] [--set KEY=VALUE]...)" >&2
       exit 2 ;;
  esac
done
[[ -x build/moetrain ]] || bash scripts/build.sh --target moetrain
out=runs/bench-lora
rm -rf "$out"
mkdir -p "$out"
shape=(--config configs/models/qwen3-30b-a3b.yaml --set model.n_layers=2 --set model.moe.n_experts=16
       --set model.vocab_size=8192 --set data.seq_len=256 --set train.global_batch_size=2 --set train.micro_batch_size=2 --set train.grad_accum=1
       --set run.device=cpu --set run.dtype=fp32 --set cost.gpu=cpu)
lora=(--set train.lora.rank=16 --set train.lora.alpha=32
      --set "train.lora.targets=[q, kv, o, experts, shared_experts, dense_mlp]")
for round in $(seq 1 "$rounds"); do
  for mode in full lora; do
    echo "bench_lora: round $round/$rounds, $mode ..." >&2
    args=("${shape[@]}")
    [[ $mode == lora ]] && args+=("${lora[@]}")
    build/moetrain bench-step "${args[@]}" "${extra[@]}" --warmup 1 --steps "$steps" --json > "$out/$mode-$round.log" 2>&1 ||
      { cat "$out/$mode-$round.log" >&2; exit 1; }
    grep '^{' "$out/$mode-$round.log" | tail -1 > "$out/$mode-$round.json"
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {m: [json.load(open(f"{out}/{m}-{r}.json")) for r in range(1, rounds + 1)] for m in ("full", "lora")}
step = {m: [j["step_s_mean"] for j in runs[m]] for m in runs}
peak = {m: max(j["peak_allocated_bytes"] for j in runs[m]) / 2**20 for m in runs}
text = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
print(f"model: {runs['full'][0]['params_total'] / 1e6:.0f}M parameters, "
      f"{runs['full'][0]['tokens_per_step']} tokens a step, {rounds} interleaved rounds")
print(f"{'':<6} {'step s':>20} {'peak MiB':>10}")
for m in runs:
    print(f"{m:<6} {text(step[m]):>20} {peak[m]:>10.0f}")
ratio = statistics.median(l / f for f, l in zip(step["full"], step["lora"]))
print(f"LoRA / full: step {ratio:.3f}, peak {peak['lora'] / peak['full']:.3f}")
PY
