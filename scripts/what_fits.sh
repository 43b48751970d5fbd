#!/usr/bin/env bash
# The README's "what fits" table, from `moetrain plan` alone: fine-tuning each configs/models/*.yaml
# on 8 x h100 (80 GB) and 8 x h200 (141 GB), and DeepSeek-V3's published layout as the README runs it.
# For each model and GPU it plans parallel.expert_parallel in the divisors of the expert count up to
# 8, parallel.zero 0 and 1, and train.activation_checkpointing none, selective and full, and
# recommends the first setting that fits in this order (fastest-looking first): no checkpointing
# before selective before full, then the smallest expert_parallel, then zero 0 before 1, then the
# bf16 weight copies kept between updates before cast at every use (run.keep_compute_copies); with it,
# the largest micro-batch that fits and divides the configs' global batch (32 sequences over 8 GPUs:
# 1, 2 or 4). Where nothing fits on 8 GPUs it finds the smallest count of 16, 32, 64, ... that fits
# (expert_parallel then up to the GPU count, the global batch at least one sequence per GPU).
# Prints the markdown table on stdout, progress on stderr; --write also puts the table into README.md
# and each setting into its fine-tuning template (between the what-fits markers), so that the figures
# in both come from one run. Needs only python3 (stdlib).
# Usage: MOETRAIN=build/moetrain scripts/what_fits.sh [--write]
set -euo pipefail
cd "$(dirname "$0")/.."
MOETRAIN=${MOETRAIN:-build/moetrain}
[[ -x "$MOETRAIN" ]] || { echo "[what_fits] $MOETRAIN not found: build it (scripts/build.sh) or set MOETRAIN" >&2; exit 1; }
[[ $# -eq 0 || "$1" == "--write" ]] || { echo "usage: MOETRAIN=build/moetrain $0 [--write]" >&2; exit 1; }
exec python3 - "$MOETRAIN" "$@" <<'PY'
import json
import pathlib
import subprocess
import sys

BIN = sys.argv[1]
WRITE = sys.argv[2:] == ["--write"]
MODELS = [  # (name in the table, architecture and training keys, the fine-tuning template users start from)
    ("OLMoE-1B-7B", "configs/models/olmoe-1b-7b.yaml", "configs/finetune-olmoe.yaml"),
    ("Qwen3-30B-A3B", "configs/models/qwen3-30b-a3b.yaml", "configs/finetune-qwen3-moe.yaml"),
    ("Mixtral-8x7B", "configs/models/mixtral-8x7b.yaml", "configs/finetune-mixtral.yaml"),
    ("DeepSeek-V2-Lite", "configs/models/deepseek-v2-lite.yaml", "configs/finetune-deepseek-v2-lite.yaml"),
    ("GLM-4.5-Air", "configs/models/glm-4.5-air.yaml", "configs/finetune-glm-4.5-air.yaml"),
    ("gpt-oss-20b", "configs/models/gpt-oss-20b.yaml", "configs/finetune-gpt-oss-20b.yaml"),
    ("gpt-oss-120b", "configs/models/gpt-oss-120b.yaml", "configs/finetune-gpt-oss-120b.yaml"),
]
GPUS = ("h100", "h200")
LORA_RANK = 16
LORA_ARGS = ["--set", f"train.lora.rank={LORA_RANK}"]
CHECKPOINTING = ("none", "selective", "full")
GLOBAL_BATCH = 32     # train.global_batch_size of configs/models/*.yaml
MAX_GPUS = 4096
GIB = 2.0 ** 30
TIGHT_GIB = 1.0       # a fit with less to spare is marked "tight"
# DeepSeek-V3's published layout, exactly as README.md's plan example runs it.
V3_ARGS = ["--config", "configs/deepseek-v3-671b.yaml", "--gpus", "2048", "--gpu", "h800",
           "--set", "parallel.pipeline_parallel=16", "--set", "parallel.expert_parallel=64",
           "--set", "parallel.zero=1", "--set", "train.global_batch_size=15360",
           "--set", "train.micro_batch_size=1", "--set", "train.grad_accum=0",
           "--set", "train.activation_checkpointing=full"]


def run_json(args):
    done = subprocess.run([BIN] + args + ["--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[what_fits] {' '.join([BIN] + args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def resolved(config):
    done = subprocess.run([BIN, "config", "--config", config], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[what_fits] {BIN} config --config {config} failed:\n{done.stderr}")
    out = done.stdout
    values = {}
    for line in out.splitlines():  # only the keys below are read; each is a unique leaf name
        key, _, value = line.strip().partition(":")
        if key in ("n_experts", "global_batch_size", "seq_len"):
            values[key] = int(value)
    return values


def total_params(config):
    return run_json(["cost", "--config", config, "--tokens", "1e12", "--mfu", "0.5"])["params_total"]


def plan(config, gpu, n_gpus, ep, zero, ac, mb, global_batch, keep, extra=()):
    return run_json(["plan", "--config", config, "--gpu", gpu, "--gpus", str(n_gpus), *extra,
                     "--set", f"run.keep_compute_copies={'true' if keep else 'false'}",
                     "--set", f"parallel.expert_parallel={ep}", "--set", f"parallel.zero={zero}",
                     "--set", f"train.activation_checkpointing={ac}", "--set", f"train.micro_batch_size={mb}",
                     "--set", f"train.global_batch_size={global_batch}", "--set", "train.grad_accum=0"])


def recommend(config, gpu, n_gpus, n_experts, max_ep, extra=(), max_mb=4):
    """The first setting in the rule's order that fits at micro-batch 1, with its largest micro-batch."""
    global_batch = max(GLOBAL_BATCH, n_gpus)
    eps = [ep for ep in range(1, min(max_ep, n_experts) + 1) if n_experts % ep == 0 and n_gpus % ep == 0]
    micro_batches = [mb for mb in range(1, min(max_mb, global_batch // n_gpus) + 1) if global_batch % (n_gpus * mb) == 0]
    for ac in CHECKPOINTING:
        for ep in eps:
            for zero in (0, 1):
                for keep in (True, False):
                    best = None
                    for mb in micro_batches:
                        p = plan(config, gpu, n_gpus, ep, zero, ac, mb, global_batch, keep, extra)
                        if not p["fits"]:
                            break
                        best = p
                    if best:
                        return dict(ac=ac, ep=ep, zero=zero, keep=keep, mb=best["micro_batch_size"],
                                    peak=best["peak_bytes"], usable=best["usable_bytes"])
    return None


def settings(r):
    return f"ep {r['ep']}, zero {r['zero']}, {r['ac']}{'' if r['keep'] else ', bf16 cast per use'}, mb {r['mb']}"


def gib(r):
    return f"{r['peak'] / GIB:.1f} of {r['usable'] / GIB:.1f}"


def tight(r):
    return " (tight)" if r["usable"] - r["peak"] < TIGHT_GIB * GIB else ""


def set_flags(r, seq_len):
    return (f"#     --set data.seq_len={seq_len} --set parallel.expert_parallel={r['ep']} --set parallel.zero={r['zero']}\n"
            f"#     --set train.activation_checkpointing={r['ac']} --set train.micro_batch_size={r['mb']}" +
            ("" if r["keep"] else "\n#     --set run.keep_compute_copies=false"))


def replace_between(path, begin, end, body):
    text = path.read_text()
    if begin not in text or end not in text:
        sys.exit(f"[what_fits] {path}: the markers {begin.strip()} and {end.strip()} are missing")
    b, e = text.index(begin) + len(begin), text.index(end)
    path.write_text(text[:b] + body + text[e:])


rows = ["| model | GPUs | parameters | expert_parallel | zero | activation_checkpointing | micro-batch | peak GiB per GPU (of usable) |",
        "|---|---|---|---|---|---|---|---|"]
templates = {}  # fine-tuning template -> its comment block
for name, config, template in MODELS:
    keys = resolved(config)
    assert keys["global_batch_size"] == GLOBAL_BATCH, f"{config}: train.global_batch_size is not {GLOBAL_BATCH}"
    params = f"{total_params(config) / 1e9:.2f}B"
    block = [f"# Fits (scripts/what_fits.sh: moetrain plan of {config} at {keys['seq_len']:,}-token",
             f"# sequences, {GLOBAL_BATCH} a step, one rank per GPU; add to the train command):"]
    for gpu in GPUS:
        print(f"[what_fits] {name} on 8 x {gpu} ...", file=sys.stderr)
        r = recommend(config, gpu, 8, keys["n_experts"], 8)
        if r:
            rows.append(f"| {name} | 8 x {gpu} | {params} | {r['ep']} | {r['zero']} | {r['ac']}{'' if r['keep'] else ' (bf16 cast per use)'} | {r['mb']} | {gib(r)}{tight(r)} |")
            block.append(f"#   8 x {gpu}, peak {gib(r)} GiB{tight(r)}:\n{set_flags(r, keys['seq_len'])}")
            continue
        n, found = 16, None
        while n <= MAX_GPUS and not found:
            print(f"[what_fits] {name} on {n} x {gpu} ...", file=sys.stderr)
            found = recommend(config, gpu, n, keys["n_experts"], n)
            n = n * 2 if not found else n
        where = f"fits on {n} ({settings(found)}: {gib(found)} GiB{tight(found)})" if found else f"nor on {MAX_GPUS}"
        rows.append(f"| {name} | 8 x {gpu} | {params} | - | - | - | - | does not fit on 8 GPUs; {where} |")
        block.append(f"#   8 x {gpu}: does not fit; " + (f"{n} x {gpu}, peak {gib(found)} GiB{tight(found)}:\n{set_flags(found, keys['seq_len'])}"
                                                         if found else f"nor on {MAX_GPUS} GPUs"))
    if template:
        templates[template] = "\n".join(block) + "\n"

# LoRA (train.lora rank 16 on every target): the frozen base in bf16 with no master, gradient or
# moments, the adapters in fp32 with theirs. The same rule, from one GPU up: the fewest GPUs that fit.
for name, config, _ in MODELS:
    keys = resolved(config)
    params = f"{total_params(config) / 1e9:.2f}B"
    for gpu in GPUS:
        n, found = 1, None
        while n <= 8 and not found:
            print(f"[what_fits] {name}, LoRA r{LORA_RANK}, on {n} x {gpu} ...", file=sys.stderr)
            found = recommend(config, gpu, n, keys["n_experts"], n, LORA_ARGS, max_mb=GLOBAL_BATCH)
            n = n * 2 if not found else n
        if found:
            rows.append(f"| {name}, LoRA r{LORA_RANK} | {n} x {gpu} | {params} | {found['ep']} | "
                        f"{found['zero']} | {found['ac']}{'' if found['keep'] else ' (bf16 cast per use)'} | {found['mb']} | "
                        f"{gib(found)}{tight(found)} |")
        else:
            rows.append(f"| {name}, LoRA r{LORA_RANK} | 8 x {gpu} | {params} | - | - | - | - | "
                        "does not fit on 8 GPUs |")

print("[what_fits] DeepSeek-V3, the published layout ...", file=sys.stderr)
v3 = run_json(["plan"] + V3_ARGS)
v3_params = total_params("configs/deepseek-v3-671b.yaml")
v3_ac = next(a.split("=", 1)[1] for a in V3_ARGS if a.startswith("train.activation_checkpointing="))
fits = "" if v3["fits"] else " (does not fit)"
rows.append(f"| DeepSeek-V3 (published layout: pp {v3['pipeline_parallel']}) | {v3['world_size']} x {v3['gpu']} | "
            f"{v3_params / 1e9:.1f}B | {v3['expert_parallel']} | {v3['zero']} | {v3_ac} | {v3['micro_batch_size']} | "
            f"{v3['peak_bytes'] / GIB:.1f} of {v3['usable_bytes'] / GIB:.1f}{fits} |")
table = "\n".join(rows) + "\n"
print(table, end="")
if WRITE:
    indented = "".join("  " + line + "\n" for line in rows)  # inside the README's list item
    replace_between(pathlib.Path("README.md"), "<!-- what-fits:begin -->\n", "  <!-- what-fits:end -->", indented)
    for template, block in templates.items():
        replace_between(pathlib.Path(template), "# what-fits:begin\n", "# what-fits:end", block)
    print("[what_fits] README.md and " + ", ".join(templates) + " updated", file=sys.stderr)
PY
