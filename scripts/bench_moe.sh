#!/usr/bin/env bash
# One MoE layer's forward+backward on the CPU: moetrain's experts implementations, a naive per-expert
# loop and Hugging Face transformers' Qwen3-MoE block, on the same weights and input, for two shapes:
# configs/tiny.yaml's MoE (d 256, 8 experts top-2, hidden 384) and a fine-grained one (d 256, 64
# experts top-8, hidden 128), 4096 tokens each. Prints one table; ratios are speed-ups (baseline ms /
# variant ms). Extra arguments go to build/moetrain_bench_moe (e.g. --threads 1 --iters 20).
# MOETRAIN_BENCH_MOE picks the binary (default build/moetrain_bench_moe). No timing is asserted; outputs
# are checked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${MOETRAIN_BENCH_MOE:-$root/build/moetrain_bench_moe}"
python="$root/third_party/venv/bin/python"

if ! "$python" -c 'import torch, transformers, safetensors' >/dev/null 2>&1; then
  echo "[bench] installing the Python packages (scripts/setup.sh)" >&2
  setup_log="$(mktemp)"
  bash "$root/scripts/setup.sh" >"$setup_log" 2>&1 || { cat "$setup_log" >&2; rm -f "$setup_log"; exit 1; }
  rm -f "$setup_log"
fi
if [ ! -x "$bin" ]; then
  echo "[bench] $bin is missing: build it with scripts/setup.sh && scripts/build.sh (or set MOETRAIN_BENCH_MOE)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

shapes=("tiny 256 8 2 384" "fine-grained 256 64 8 128")
for shape in "${shapes[@]}"; do
  read -r name d_model experts top_k hidden <<<"$shape"
  echo "[bench] $name: d_model $d_model, $experts experts top-$top_k, hidden $hidden, 4096 tokens" >&2
  "$bin" --tokens 4096 --d-model "$d_model" --experts "$experts" --top-k "$top_k" --hidden "$hidden" \
    --save-weights "$tmp/$name.safetensors" --json "$@" >"$tmp/$name.moetrain.json"
  "$python" "$root/scripts/bench_moe_hf.py" "$tmp/$name.safetensors" >"$tmp/$name.hf.json"
done

"$python" - "$tmp" "${shapes[@]}" <<'EOF'
import json
import sys

tmp, shapes = sys.argv[1], [s.split() for s in sys.argv[2:]]
TOLERANCE = 1e-4
rows, mismatches, notes = [], [], []
for name, d_model, experts, top_k, hidden in shapes:
    ours = json.load(open(f"{tmp}/{name}.moetrain.json"))
    hf = json.load(open(f"{tmp}/{name}.hf.json"))
    variants = ours["variants"] + hf["variants"]
    timed = [v for v in variants if "ms" in v]
    naive = next(v for v in timed if v["name"] == "naive loop")
    transformers = next((v for v in timed if v["name"].startswith("transformers")), None)
    label = f"{name} (d{d_model} E{experts} k{top_k} F{hidden})"
    for v in variants:
        if "ms" not in v:
            rows.append([label, v["name"], "-", "-", "-", "-", v.get("skipped", "")])
            continue
        vs_tf = f"{transformers['ms'] / v['ms']:.2f}x" if transformers else "-"
        rows.append([label, v["name"], f"{v['ms']:.2f}", f"{v['tokens_per_s']:,.0f}",
                     f"{naive['ms'] / v['ms']:.2f}x", vs_tf, v.get("note", "")])
        worst = max(v["max_abs_diff_out"], v["max_abs_diff_grad_x"])
        if worst >= TOLERANCE:
            mismatches.append(f"{label} {v['name']}: {worst:.2e}")
    if transformers:
        notes.append(f"{label}: 'vs transformers' is against {transformers['name']}")

header = ["shape", "variant", "ms/iter", "tokens/s", "vs naive loop", "vs transformers", "note"]
right = {2, 3, 4, 5}
width = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
def line(r):
    cells = [r[c].rjust(width[c]) if c in right else r[c].ljust(width[c]) for c in range(len(r))]
    return "  ".join(cells).rstrip()
print(line(header))
print(line(["-" * w for w in width]))
for i, r in enumerate(rows):
    if i and r[0] != rows[i - 1][0]:
        print()
    print(line(r))
cfg = json.load(open(f"{tmp}/{shapes[0][0]}.moetrain.json"))["config"]
hf_cfg = json.load(open(f"{tmp}/{shapes[0][0]}.hf.json"))["config"]
print(f"\nforward+backward, median of {cfg['iters']} after {cfg['warmup']} warm-up, {cfg['threads']} threads, fp32;"
      f" torch {hf_cfg['torch']}, transformers {hf_cfg['transformers']}. Ratios: baseline ms / variant ms.")
for n in notes:
    print(n)
if mismatches:
    print(f"[bench] outputs or input gradients differ from the naive loop by {TOLERANCE:g} or more:", file=sys.stderr)
    for m in mismatches:
        print("  " + m, file=sys.stderr)
    sys.exit(1)
print(f"every variant's output and input gradient match the naive loop within {TOLERANCE:g}")
EOF
