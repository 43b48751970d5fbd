#!/usr/bin/env bash
# Pipeline parallelism on this machine: bench-step of configs/tiny.yaml (4 blocks) at pp 1, 2 and 4,
# one data-parallel rank per stage (store backend on the CPU), the same global batch in 4 micro-batches.
# For each: the step time, the bytes rank 0 (the first stage) sent point to point per step beside the
# analytic count (one micro-batch's activations, micro_batch x seq_len x d_model fp32, per micro-batch:
# the first stage only sends forward), the 1F1B bubble (pp - 1) / (m + pp - 1), and the loss after
# the timed steps (the same training at every pp).
# Usage: scripts/bench_pp.sh [--steps N] [extra --set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3
if [[ "${1:-}" == "--steps" ]]; then steps="$2"; shift 2; fi
[[ -x build/moetrain ]] || bash scripts/build.sh
out=runs/bench-pp
mkdir -p "$out"
common=(--set data.seq_len=128 --set train.global_batch_size=0 --set train.micro_batch_size=4
        --set train.grad_accum=4 --set run.threads=1)
for pp in 1 2 4; do
  echo "bench_pp: pp $pp ..." >&2
  OMP_NUM_THREADS=1 scripts/launch.sh --nproc "$pp" -- build/moetrain bench-step --config configs/tiny.yaml \
    "${common[@]}" --set parallel.pipeline_parallel="$pp" --warmup 1 --steps "$steps" --json "$@" \
    > "$out/pp$pp.log" 2>&1 || { cat "$out/pp$pp.log" >&2; exit 1; }
  grep '^\(\[rank 0\] \)\?{' "$out/pp$pp.log" | sed 's/^\[rank 0\] //' > "$out/pp$pp.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'pp':>3} {'blocks/stage':>13} {'step ms':>8} {'p2p MiB/step':>13} {'analytic MiB':>13} {'bubble':>7} {'last loss':>10}")
for pp in (1, 2, 4):
    j = json.load(open(f"{out}/pp{pp}.json"))
    m = j["grad_accum"]
    activation = j["tokens_per_step"] // m * j["d_model"] * 4  # one rank per stage: a micro-batch's tokens
    analytic = m * activation if pp > 1 else 0
    bubble = (pp - 1) / (m + pp - 1)
    blocks = ",".join(str(n) for n in j["pp_layers"])
    print(f"{pp:>3} {blocks:>13} {1e3 * j['step_s_mean']:>8.1f} {j['p2p_bytes_per_step'] / 2**20:>13.3f} "
          f"{analytic / 2**20:>13.3f} {bubble:>7.3f} {j['last_loss']:>10.5f}")
print("(rank 0 is the first stage: it sends each micro-batch's activations forward and receives their gradients;"
      " a middle stage sends twice that. On 2 cores the stages share the CPU, so the step time shows the"
      " schedule's overhead, not a speed-up.)")
PY
