#!/usr/bin/env bash
# Memory against speed on this machine, side by side in one run (issue 13's benchmark): bench-step of
# a deeper CPU model (tiny.yaml at 8 layers, d_model 512, vocabulary 32,768, 512-token sequences, fp32)
# with each of the memory switches, and for each the peak of bytes LibTorch allocated, the step time,
# tokens/s and what `moetrain plan` predicted.
#   1. train.activation_checkpointing none / selective / full, each at micro-batch 4 and 8 (the loss
#      in 512-token chunks, so that only activations grow with the micro-batch, and large enough that
#      every mode peaks in backward, not in the optimizer step): activation memory per sequence is the
#      difference of the two peaks over 4. Target: full keeps at most 40% of none's (a cut of at least
#      60%) for at most 40% more step time.
#   2. train.loss_chunk_tokens 0 against 512 at micro-batch 4: the peak the full logits add, against
#      tokens x vocabulary x 4 bytes (target: the chunked loss removes that peak).
#   3. parallel.zero 0 against 1 at world 2 (store backend).
#   4. With --baseline DIR (a checkout built before issue 13, e.g. `git worktree add` of 658039d and
#      scripts/build.sh there): configs/tiny.yaml's tokens/s with both binaries, runs interleaved
#      three times (this shared machine's run-to-run spread is about 10%); target: no lower than before.
# Usage: scripts/bench_memory.sh [--steps N] [--baseline DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=2
baseline=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --baseline) baseline="$2"; shift 2 ;;
    *) echo "bench_memory: unknown argument '$1' (expected --steps N or --baseline DIR)" >&2; exit 2 ;;
  esac
done
if [[ -n "$baseline" && ! -x "$baseline/build/moetrain" ]]; then
  echo "bench_memory: --baseline $baseline has no build/moetrain (run scripts/build.sh there)" >&2
  exit 2
fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-memory
mkdir -p "$out"
deep=(--config configs/tiny.yaml --set model.n_layers=8 --set model.d_model=512 --set model.vocab_size=32768
      --set model.max_seq_len=512 --set data.seq_len=512 --set run.threads=1)

# name, world, extra --set arguments: rank 0's bench-step JSON into $out/name.json, plan's into name.plan.json
bench() {
  local name="$1" world="$2"
  shift 2
  echo "bench_memory: $name ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$world" -- build/moetrain bench-step "${deep[@]}" "$@" \
    --warmup 1 --steps "$steps" --json > "$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
  grep '{' "$out/$name.log" | tail -1 | sed 's/^\[rank 0\] //' > "$out/$name.json"
  build/moetrain plan "${deep[@]}" "$@" --gpus "$world" --gpu cpu --json | tail -1 > "$out/$name.plan.json"
}
for ac in none selective full; do
  for mb in 4 8; do
    bench "ac-$ac-mb$mb" 1 --set train.activation_checkpointing=$ac --set train.global_batch_size=$mb \
      --set train.micro_batch_size=$mb --set train.loss_chunk_tokens=512
  done
done
bench "logits-full" 1 --set train.global_batch_size=4 --set train.micro_batch_size=4 --set train.loss_chunk_tokens=0
bench "zero0-w2" 2 --set train.global_batch_size=2 --set train.loss_chunk_tokens=512 --set parallel.zero=0
bench "zero1-w2" 2 --set train.global_batch_size=2 --set train.loss_chunk_tokens=512 --set parallel.zero=1

if [[ -n "$baseline" ]]; then
  for round in 1 2 3; do
    for which in now before; do
      echo "bench_memory: tiny.yaml, $which, round $round ..." >&2
      if [[ $which == now ]]; then bin=build/moetrain config=configs/tiny.yaml; else
        bin="$baseline/build/moetrain" config="$baseline/configs/tiny.yaml"; fi
      OMP_NUM_THREADS=2 "$bin" bench-step --config "$config" --set run.threads=2 --warmup 1 --steps 4 --json \
        > "$out/tiny-$which-$round.log" 2>&1 || { cat "$out/tiny-$which-$round.log" >&2; exit 1; }
      grep '^{' "$out/tiny-$which-$round.log" | tail -1 > "$out/tiny-$which-$round.json"
    done
  done
fi

python3 - "$out" "$baseline" <<'PY'
import json, os, statistics, sys
out, baseline = sys.argv[1], sys.argv[2]
load = lambda name: json.load(open(f"{out}/{name}.json"))
plan = lambda name: json.load(open(f"{out}/{name}.plan.json"))
MiB = 2**20
print(f"{'run':<22} {'peak MiB':>9} {'plan MiB':>9} {'plan/meas':>9} {'step s':>7} {'tokens/s':>9} {'last loss':>10}")
names = [f"ac-{ac}-mb{mb}" for ac in ("none", "selective", "full") for mb in (4, 8)]
names += ["logits-full", "zero0-w2", "zero1-w2"]
for n in names:
    j, p = load(n), plan(n)
    print(f"{n:<22} {j['peak_allocated_bytes'] / MiB:>9.1f} {p['peak_bytes'] / MiB:>9.1f} "
          f"{p['peak_bytes'] / j['peak_allocated_bytes']:>9.3f} {j['step_s_mean']:>7.2f} {j['tokens_per_s']:>9.1f} "
          f"{j['last_loss']:>10.5f}")
print()
per_sequence = {ac: (load(f"ac-{ac}-mb8")["peak_allocated_bytes"] - load(f"ac-{ac}-mb4")["peak_allocated_bytes"]) / 4
                for ac in ("none", "selective", "full")}
step = {ac: load(f"ac-{ac}-mb8")["step_s_mean"] for ac in ("none", "selective", "full")}
print("activation memory per sequence ((peak at micro-batch 8 - peak at 4) / 4), step time at micro-batch 8:")
for ac in ("none", "selective", "full"):
    print(f"  {ac:<10} {per_sequence[ac] / MiB:>8.1f} MiB  ({per_sequence[ac] / per_sequence['none']:.3f} of none)  "
          f"step {step[ac]:.2f} s ({step[ac] / step['none']:.3f} of none)")
cut, slower = 1 - per_sequence["full"] / per_sequence["none"], step["full"] / step["none"] - 1
print(f"full checkpointing: activation memory cut by {100 * cut:.1f}% (target >= 60%) for {100 * slower:+.1f}% "
      f"step time (target <= +40%): {'met' if cut >= 0.6 and slower <= 0.4 else 'NOT met'}")
full_logits = load("logits-full")["peak_allocated_bytes"] - load("ac-none-mb4")["peak_allocated_bytes"]
tokens_vocab = 4 * 512 * 32768 * 4
print(f"chunked loss at micro-batch 4: the full logits add {full_logits / MiB:.1f} MiB to the peak, "
      f"{full_logits / tokens_vocab:.2f} x (tokens x vocabulary x 4 bytes = {tokens_vocab / MiB:.0f} MiB)")
z0, z1 = load("zero0-w2"), load("zero1-w2")
print(f"ZeRO-1 at world 2: peak {z1['peak_allocated_bytes'] / MiB:.1f} MiB against {z0['peak_allocated_bytes'] / MiB:.1f} "
      f"at zero 0 ({z1['peak_allocated_bytes'] / z0['peak_allocated_bytes']:.3f}); optimizer state "
      f"{z1['optimizer_state_bytes'] / MiB:.1f} against {z0['optimizer_state_bytes'] / MiB:.1f} MiB; "
      f"step {z1['step_s_mean']:.2f} against {z0['step_s_mean']:.2f} s; same loss: {z0['last_loss'] == z1['last_loss']}")
if baseline:
    now = [load(f"tiny-now-{r}")["tokens_per_s"] for r in (1, 2, 3)]
    before = [load(f"tiny-before-{r}")["tokens_per_s"] for r in (1, 2, 3)]
    ratio = statistics.median(now) / statistics.median(before)
    print(f"configs/tiny.yaml tokens/s, three interleaved rounds: now {', '.join(f'{x:.0f}' for x in now)}; "
          f"before issue 13 ({baseline}) {', '.join(f'{x:.0f}' for x in before)}; median ratio {ratio:.3f} "
          f"(target >= 1, within this machine's ~10% spread)")
PY
