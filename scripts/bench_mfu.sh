#!/usr/bin/env bash
# The CPU MFU is only as good as the peak it is divided by, which on the CPU is measured at start-up
# (csrc/cost/hardware.cpp). This runs the same bench-step of configs/tiny.yaml twice, one after the
# other, and prints each run's probed peak, tokens/s and MFU next to the ratio between the runs: two
# identical runs should agree within 10%, and no MFU should be above 100%.
# Usage: scripts/bench_mfu.sh [--steps N] [extra --set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=5
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; shift 2; fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-mfu
mkdir -p "$out"
for run in 1 2; do
  echo "bench_mfu: run $run ..." >&2
  build/moetrain bench-step --config configs/tiny.yaml --set run.device=cpu --warmup 2 --steps "$steps" --json "$@" \
    > "$out/run$run.log" 2>&1 || { cat "$out/run$run.log" >&2; exit 1; }
  grep '^{' "$out/run$run.log" | tail -1 > "$out/run$run.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = [json.load(open(f"{out}/run{i}.json")) for i in (1, 2)]
print(f"{'run':>4} {'peak TFLOP/s':>13} {'tok/s':>8} {'MFU %':>7}")
for i, j in enumerate(runs, 1):
    print(f"{i:>4} {j['peak_tflops']:>13.4f} {j['tokens_per_s']:>8.0f} {100 * j['mfu']:>7.1f}")
a, b = runs[0]["mfu"], runs[1]["mfu"]
ratio = max(a, b) / min(a, b)
print(f"MFU ratio between the runs: {ratio:.3f} ({'within' if ratio <= 1.10 else 'NOT within'} 10%); "
      f"peak ratio {max(r['peak_tflops'] for r in runs) / min(r['peak_tflops'] for r in runs):.3f}; "
      f"highest MFU {100 * max(a, b):.1f}% ({'ok' if max(a, b) <= 1 else 'ABOVE 100%'})")
print(f"peak: {runs[0]['peak_source']}")
PY
