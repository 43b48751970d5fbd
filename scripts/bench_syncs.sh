#!/usr/bin/env bash
# Host syncs, operator calls and CPU speed of the training step, and (with --baseline) the same figures
# of another build side by side: bench-step --json of configs/tiny.yaml and configs/tiny-deepseek.yaml
# at world 1 and at (world 2, expert_parallel 2), each without and with full activation checkpointing
# (seq 64, 8 sequences a step in 2 micro-batches, run.threads 1, store backend on the CPU).
#   host syncs/step   where the host would wait for the device or a collective (common/host_sync.h:
#                     counted by code path, so the CPU counts what a GPU run does), rank 0
#   per layer-micro   the same divided by MoE layers x micro-batches (the per-step constant included)
#   ops/step          ATen operator calls per step on rank 0 (the CPU's stand-in for kernel launches)
#   tok/s             the median over the rounds, with its min-max spread; the runs of the two builds
#                     are interleaved (baseline, this build, baseline, ...) so load drifts hit both alike
# Usage: scripts/bench_syncs.sh [--baseline DIR] [--rounds N] [--steps N]
#   DIR is another checkout of moetrain with its build/moetrain built (e.g. a git worktree of an older
#   commit: `git worktree add ../base <commit> && (cd ../base && scripts/build.sh --target moetrain)`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
baseline="" rounds=3 steps=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --baseline) baseline="${2:?--baseline needs a folder}"; shift 2 ;;
    --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    *) echo "bench_syncs: unknown option '$1' (usage: scripts/bench_syncs.sh [--baseline DIR] [--rounds N] [--steps N])" >&2; exit 2 ;;
  esac
done
[[ -x build/moetrain ]] || bash scripts/build.sh --target moetrain
builds=(current)
declare -A binary=([current]="$root/build/moetrain")
if [[ -n "$baseline" ]]; then
  [[ -x "$baseline/build/moetrain" ]] || { echo "bench_syncs: $baseline/build/moetrain is missing: build that checkout first" >&2; exit 1; }
  builds=(baseline current)
  binary[baseline]="$(cd "$baseline" && pwd)/build/moetrain"
fi
out=runs/bench-syncs
rm -rf "$out"
mkdir -p "$out"
common=(--set data.seq_len=64 --set train.global_batch_size=8 --set train.grad_accum=2 --set run.threads=1
        --warmup 1 --steps "$steps" --json)
cases=()
for config in tiny tiny-deepseek; do
  for world in 1 2; do
    for ckpt in none full; do cases+=("$config $world $ckpt"); done
  done
done
for round in $(seq 1 "$rounds"); do
  for case in "${cases[@]}"; do
    read -r config world ckpt <<< "$case"
    for build in "${builds[@]}"; do
      name="$config-w$world-$ckpt-$build-$round"
      echo "bench_syncs: round $round/$rounds, $config world $world checkpointing $ckpt ($build) ..." >&2
      OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$world" -- "${binary[$build]}" bench-step \
        --config "configs/$config.yaml" --set parallel.expert_parallel="$world" \
        --set train.activation_checkpointing="$ckpt" "${common[@]}" > "$out/$name.log" 2>&1 ||
        { cat "$out/$name.log" >&2; exit 1; }
      grep '^\[rank 0\] {' "$out/$name.log" | sed 's/^\[rank 0\] //' > "$out/$name.json"
    done
  done
done
python3 - "$out" "$rounds" "${builds[*]}" "${cases[@]}" <<'PY'
import json, statistics, sys
out, rounds, builds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
def runs(case, build):
    config, world, ckpt = case.split()
    return [json.load(open(f"{out}/{config}-w{world}-{ckpt}-{build}-{r}.json")) for r in range(1, rounds + 1)]
def arrow(values, fmt):
    return " -> ".join(fmt.format(v) for v in values)
head = "before -> after" if len(builds) == 2 else "this build"
print(f"{'config':<14} {'world':>5} {'ckpt':>5} | {'host syncs/step':>17} {'per layer-micro':>16} "
      f"{'ops/step':>17} | {'tok/s (min-max)':>35} {'ratio':>6}")
print(f"{'':<14} {'':>5} {'':>5} | {head:>17} {head:>16} {head:>17} |")
for case in cases:
    config, world, ckpt = case.split()
    syncs, per, ops, speed, spread = [], [], [], [], []
    for build in builds:
        js = runs(case, build)
        j = js[0]
        syncs.append(j["host_syncs_per_step"])
        per.append(j["host_syncs_per_step"] / (j["moe_layers"] * j["grad_accum"]))
        ops.append(j["ops_per_step"])
        tps = [x["tokens_per_s"] for x in js]
        speed.append(statistics.median(tps))
        spread.append(f"{statistics.median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f})")
    ratio = f"{speed[-1] / speed[0]:.3f}" if len(builds) == 2 else ""
    print(f"{config:<14} {world:>5} {ckpt:>5} | {arrow(syncs, '{:.0f}'):>17} {arrow(per, '{:.1f}'):>16} "
          f"{arrow(ops, '{:.0f}'):>17} | {' -> '.join(spread):>35} {ratio:>6}")
last = runs(cases[-1], builds[-1])[0]
print("\nrank 0's host syncs by reason, this build, last case:", json.dumps(last["host_syncs_by_reason"]))
print("(ratio: this build's median tok/s over the baseline's; within the min-max spreads it is noise.)")
PY
