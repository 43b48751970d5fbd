#!/usr/bin/env bash
# GRPO end to end on 2 CPU cores: a synthetic task with verifiable answers (two-digit addition), a brief
# SFT of a tiny MoE on part of it, then `moetrain rl`; held-out exact match (greedy) before and after, and
# the reward curve as a PNG.
#   scripts/rl_demo.sh --data-only   writes data/rl-demo/ (seconds)
#   scripts/rl_demo.sh               everything (runs/rl-demo/, replaced each time)
set -euo pipefail
cd "$(dirname "$0")/.."

py=third_party/venv/bin/python
[ -x "$py" ] || py=python3
bin=build/moetrain
data=data/rl-demo
out=runs/rl-demo
sft_steps=${SFT_STEPS:-1500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

die() { echo "[rl_demo] $*" >&2; exit 1; }
stage() { echo; echo "== $* ($((SECONDS))s)"; }

stage "task data: two-digit additions, SFT / RL / held-out splits"
"$py" scripts/rl_demo.py data "$data"
[ -x "$bin" ] || die "$bin is missing: run scripts/build.sh first"
"$bin" prepare-data --text "$data/sft.txt" --out "$data/sft" --val-fraction 0.05 --overwrite
[ "${1:-}" = "--data-only" ] && exit 0

rm -rf "$out"
mkdir -p "$out"
stage "SFT: $sft_steps steps on a quarter of the training problems"
"$bin" train --config configs/rl-demo.yaml --set run.out_dir="$out/sft" --set train.steps="$sft_steps" \
  --set optim.lr=3e-3 --set optim.min_lr=3e-4 --set optim.schedule=cosine --set optim.warmup_steps=20 \
  --set train.log_every=50 --set train.eval_every=0 --set checkpoint.every=0 > "$out/sft.log" 2>&1 ||
  die "SFT failed: $(tail -n 1 "$out/sft.log") (log: $out/sft.log)"
grep "^step\|done" "$out/sft.log" | tail -n 3

stage "GRPO from the SFT checkpoint"
"$bin" rl --config configs/rl-demo.yaml --set model.init_from="ckpt:$out/sft" --set run.out_dir="$out/rl" 2>&1 |
  tee "$out/rl.log" | grep -E "held-out|^step|done" || die "GRPO failed (log: $out/rl.log)"

stage "result"
"$py" scripts/rl_demo.py plot "$out/rl/metrics.jsonl" "$out/reward_curve.png" || echo "[rl_demo] no plot (matplotlib missing?)"
before=$(grep -o "held-out accuracy before RL: [0-9.]*%" "$out/rl.log" | grep -o "[0-9.]*%" || true)
after=$(tail -n 1 "$out/rl/metrics.jsonl" | "$py" -c 'import json,sys; print("%.1f%%" % (100*json.load(sys.stdin)["eval_accuracy"]))')
echo "held-out exact match (greedy, 300 unseen sums): before GRPO $before, after GRPO $after ($((SECONDS))s in all)"
