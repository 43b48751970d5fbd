#!/usr/bin/env bash
# Muon against AdamW on configs/tiny.yaml and configs/tiny-deepseek.yaml (Debian's fortunes, byte level):
# each optimizer trains with each learning rate of its sweep (the same number of runs and steps for
# both), evaluating every --eval-every steps, and keeps its best learning rate (the lowest final
# validation loss). The target is the best AdamW run's final validation loss; the figure is the tokens
# each best run needed to first reach it (at an evaluation), and their ratio AdamW / Muon. The step
# time is the median over a run's steps (each logged) of elapsed_s differences, so the ratio Muon / AdamW
# shows what Newton-Schulz costs per step on this machine. Warmup takes the configs' fraction (30 of 400
# steps) of --steps. Both best runs' loss curves go to
# runs/bench-muon/<config>.png (matplotlib, when installed). MOETRAIN_BIN names another binary than
# build/moetrain (a copy, so that a rebuild during the bench does not change the binary under it).
# Usage: scripts/bench_muon.sh [--steps N] [--eval-every N] [--configs "tiny tiny-deepseek"]
#                              [--adamw-lrs "1e-3 3e-3 1e-2"] [--muon-lrs "1e-3 3e-3 1e-2"] [--set KEY=VALUE]...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
steps=400 eval_every=50 configs="tiny tiny-deepseek" adamw_lrs="1e-3 3e-3 1e-2" muon_lrs="1e-3 3e-3 1e-2" extra=()
usage="usage: scripts/bench_muon.sh [--steps N] [--eval-every N] [--configs LIST] [--adamw-lrs LIST] [--muon-lrs LIST] [--set KEY=VALUE]..."
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    --eval-every) eval_every="${2:?--eval-every needs a number}"; shift 2 ;;
    --configs) configs="${2:?--configs needs a list}"; shift 2 ;;
    --adamw-lrs) adamw_lrs="${2:?--adamw-lrs needs a list}"; shift 2 ;;
    --muon-lrs) muon_lrs="${2:?--muon-lrs needs a list}"; shift 2 ;;
    --set) extra+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    *) echo "bench_muon: unknown option '$1' ($usage)" >&2; exit 2 ;;
  esac
done
if [[ $(wc -w <<< "$adamw_lrs") != $(wc -w <<< "$muon_lrs") ]]; then
  echo "bench_muon: --adamw-lrs and --muon-lrs must hold as many values (the same budget for both)" >&2
  exit 2
fi
bin="${MOETRAIN_BIN:-build/moetrain}"
[[ -x "$bin" ]] || bash scripts/build.sh --target moetrain
if [[ ! -f data/fortunes/train.bin || ! -f data/fortunes/val.bin ]]; then
  python3 scripts/make_fortunes_corpus.py data/fortunes/corpus.txt
  "$bin" prepare-data --text data/fortunes/corpus.txt --out data/fortunes
fi
out=runs/bench-muon
rm -rf "$out"
mkdir -p "$out"
for config in $configs; do
  for optimizer in adamw muon; do
    lrs=$adamw_lrs
    [[ $optimizer == muon ]] && lrs=$muon_lrs
    for lr in $lrs; do
      name="$config-$optimizer-$lr"
      echo "bench_muon: $config, $optimizer, lr $lr, $steps steps ..." >&2
      min_lr=$(python3 -c "print($lr / 10)")
      # The configs warm up over 30 of their 400 steps: the same fraction of a shorter run (at least 1).
      warmup=$(( steps * 3 / 40 > 0 ? steps * 3 / 40 : 1 ))
      "$bin" train --config "configs/$config.yaml" --set optim.name="$optimizer" --set optim.lr="$lr" \
        --set optim.min_lr="$min_lr" --set train.steps="$steps" --set optim.decay_steps="$steps" \
        --set optim.warmup_steps="$warmup" --set train.log_every=1 --set train.eval_every="$eval_every" --set checkpoint.every=0 --set run.out_dir="$out/$name" \
        "${extra[@]}" > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log" >&2; exit 1; }
    done
  done
done
py=python3  # the set-up's venv has matplotlib for the plot
[[ -x third_party/venv/bin/python ]] && py=third_party/venv/bin/python
"$py" - "$out" "$configs" "$adamw_lrs" "$muon_lrs" <<'PY'
import json, statistics, sys
out, configs, lrs = sys.argv[1], sys.argv[2].split(), {"adamw": sys.argv[3].split(), "muon": sys.argv[4].split()}

def load(name):
    rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
    evals = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    # Seconds per step between consecutive logged steps (the median leaves out those holding an evaluation).
    logged = [(r["step"], r["elapsed_s"]) for r in rows]
    gaps = [(e1 - e0) / (s1 - s0) for (s0, e0), (s1, e1) in zip(logged, logged[1:]) if s1 > s0]
    step_s = statistics.median(gaps) if gaps else float("nan")
    return {"evals": evals, "final": evals[-1][1], "step_s": step_s, "train": [(r["tokens"], r["loss"]) for r in rows]}

def tokens_to(run, target):
    return next((t for t, v in run["evals"] if v <= target), None)

for config in configs:
    runs = {o: {lr: load(f"{config}-{o}-{lr}") for lr in lrs[o]} for o in lrs}
    print(f"{config}: final val loss per learning rate")
    for o in runs:
        print("  " + o.ljust(6) + "  ".join(f"lr {lr}: {r['final']:.4f}" for lr, r in runs[o].items()))
    best = {o: min(runs[o], key=lambda lr: runs[o][lr]["final"]) for o in runs}
    target = runs["adamw"][best["adamw"]]["final"]
    reach = {o: tokens_to(runs[o][best[o]], target) for o in runs}
    print(f"  target: the best AdamW run's final val loss {target:.4f} (adamw lr {best['adamw']}, muon lr {best['muon']})")
    for o in runs:
        r = runs[o][best[o]]
        print(f"  {o:<6} tokens to target {reach[o] if reach[o] is not None else 'not reached':>10}, "
              f"final val loss {r['final']:.4f}, median step {r['step_s']:.3f} s")
    if reach["muon"]:
        print(f"  tokens ratio AdamW / Muon: {reach['adamw'] / reach['muon']:.3f}")
    print(f"  step time ratio Muon / AdamW: {runs['muon'][best['muon']]['step_s'] / runs['adamw'][best['adamw']]['step_s']:.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        continue
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        r = runs[o][best[o]]
        ax.plot(*zip(*r["train"]), color=color, alpha=0.35, lw=0.8)
        ax.plot(*zip(*r["evals"]), color=color, marker="o", label=f"{o} lr {best[o]} (val)")
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{config}: Muon against AdamW (train faint, validation marked)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/{config}.png", dpi=120)
    print(f"  plot: {out}/{config}.png")
PY
