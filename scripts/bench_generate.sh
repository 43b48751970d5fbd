#!/usr/bin/env bash
# Generation speed on this CPU: `moetrain generate` with the KV cache against its recompute path
# (--no-cache) and against transformers' generate, greedy, on one set of weights, random (transformers'
# own initialisation, seed 0), imported with `moetrain convert` and exported again with
# `moetrain convert --to hf:DIR`, the folder both sides then load. fp32, the same thread count on both.
#   --family qwen3_moe (default)  Qwen3-30B-A3B's shape cut as scripts/bench_lora.sh cuts it (2 layers,
#                                 16 routed experts of top-8, an 8192-token vocabulary; widths and heads
#                                 as published; about 220M parameters)
#   --family deepseek_v3          DeepSeek-V3's attention as published (128 heads, q rank 1536, latent
#                                 512, no-RoPE/RoPE/value head dims 128/64/128) on a 2048-wide, 2-layer
#                                 model with 16 routed experts of top-8 and a shared one: the MLA decode
#                                 (moetrain caches the latent and absorbs wkv_b; transformers caches the
#                                 expanded keys and values)
#   tokens/s   new tokens over the seconds generation took (the prompt's prefill included, loading not):
#              moetrain's --timing line; transformers' generate timed alone after a warm-up call
#   = rows     how many rows' greedy tokens equal the cache's (random weights give near-tied logits, so
#              a rounding-level difference can flip a token; the tests check exact equality on real
#              tiny models)
# Usage: scripts/bench_generate.sh [--family qwen3_moe|deepseek_v3] [--prompt-len N] [--new-tokens N] [--threads N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
prompt_len=32 new_tokens=32 threads=2 family=qwen3_moe
usage="usage: scripts/bench_generate.sh [--family qwen3_moe|deepseek_v3] [--prompt-len N] [--new-tokens N] [--threads N]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --family) family="${2:?--family needs qwen3_moe or deepseek_v3}"; shift 2 ;;
    --prompt-len) prompt_len="${2:?--prompt-len needs a number}"; shift 2 ;;
    --new-tokens) new_tokens="${2:?--new-tokens needs a number}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a number}"; shift 2 ;;
    *) echo "bench_generate: unknown option '$1' ($usage)" >&2
       exit 2 ;;
  esac
done
case "$family" in
  qwen3_moe|deepseek_v3) ;;
  *) echo "bench_generate: --family $family is not qwen3_moe or deepseek_v3 ($usage)" >&2; exit 2 ;;
esac
[[ -x build/moetrain ]] || bash scripts/build.sh --target moetrain
py=third_party/venv/bin/python
out=runs/bench-generate-$family
rm -rf "$out"
mkdir -p "$out"

echo "bench_generate: random weights and prompts ..." >&2
OMP_NUM_THREADS=$threads "$py" - "$out" "$prompt_len" "$family" <<'PY'
import json, sys, torch, transformers
out, prompt_len, family = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
if family == "qwen3_moe":
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=8192, hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=16, num_experts_per_tok=8,
        norm_topk_prob=True, mlp_only_layers=[], max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(f"{out}/random")
else:
    cfg = transformers.DeepseekV3Config(
        vocab_size=8192, hidden_size=2048, num_hidden_layers=2, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, n_routed_experts=16, num_experts_per_tok=8,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=0, max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
        rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(f"{out}/random")
ids = torch.randint(0, cfg.vocab_size, (8, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
for batch in (1, 8):
    with open(f"{out}/prompts{batch}.jsonl", "w") as f:
        for row in ids[:batch]:
            f.write(json.dumps({"prompt_ids": row}) + "\n")
PY
build/moetrain convert --from "hf:$out/random" --to "$out/run" > "$out/convert.log" 2>&1 || { cat "$out/convert.log" >&2; exit 1; }
build/moetrain convert --from "$out/run" --to "hf:$out/hf" >> "$out/convert.log" 2>&1 || { cat "$out/convert.log" >&2; exit 1; }

for batch in 1 8; do
  for mode in cache recompute; do
    echo "bench_generate: moetrain, batch $batch, $mode ..." >&2
    flags=()
    [[ $mode == recompute ]] && flags+=(--no-cache)
    OMP_NUM_THREADS=$threads build/moetrain generate --checkpoint "hf:$out/hf" --prompts "$out/prompts$batch.jsonl" \
      --max-new-tokens "$new_tokens" --temperature 0 --timing "${flags[@]}" > "$out/$mode-$batch.jsonl" 2> "$out/$mode-$batch.log" ||
      { cat "$out/$mode-$batch.log" >&2; exit 1; }
  done
  echo "bench_generate: transformers, batch $batch ..." >&2
  OMP_NUM_THREADS=$threads "$py" - "$out" "$batch" "$new_tokens" "$threads" > "$out/hf-$batch.json" <<'PY'
import json, sys, time, torch, transformers
out, batch, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/hf", dtype=torch.float32).eval()
rows = [json.loads(line)["prompt_ids"] for line in open(f"{out}/prompts{batch}.jsonl")]
ids = torch.tensor(rows)
kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
with torch.no_grad():
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    start = time.perf_counter()
    got = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds,
                  "completions": got[:, ids.shape[1]:].tolist()}))
PY
done

"$py" - "$out" "$prompt_len" "$new_tokens" "$threads" "$family" <<'PY'
import json, re, sys
out, prompt_len, new_tokens, threads, family = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
def ours(mode, batch):
    line = open(f"{out}/{mode}-{batch}.log").read()
    rate = float(re.search(r"([0-9.]+) tokens/s", line).group(1))
    rows = [json.loads(l)["completion_ids"] for l in open(f"{out}/{mode}-{batch}.jsonl")]
    return rate, rows
shape = ("Qwen3-MoE shape, 2 layers, 16 experts top-8" if family == "qwen3_moe" else
         "DeepSeek-V3 attention (MLA, 128 heads, latent 512), 2 layers of width 2048, 16 experts top-8 + 1 shared")
print(f"{shape}, vocab 8192 (random weights), fp32, {threads} threads, "
      f"prompt {prompt_len} tokens, {new_tokens} new tokens per row, greedy")
print(f"{'batch':>5} {'cache tok/s':>12} {'recompute':>10} {'transformers':>13} {'cache/recompute':>16} "
      f"{'cache/transformers':>19} {'cache = recompute':>18} {'= transformers':>15}")
for batch in (1, 8):
    cache, cache_rows = ours("cache", batch)
    recompute, recompute_rows = ours("recompute", batch)
    hf = json.load(open(f"{out}/hf-{batch}.json"))
    same_recompute = f"{sum(a == b for a, b in zip(cache_rows, recompute_rows))}/{batch} rows"
    same_hf = f"{sum(a == b for a, b in zip(cache_rows, hf['completions']))}/{batch} rows"
    print(f"{batch:>5} {cache:>12.1f} {recompute:>10.1f} {hf['tokens_per_s']:>13.1f} {cache / recompute:>16.2f} "
          f"{cache / hf['tokens_per_s']:>19.2f} {same_recompute:>18} {same_hf:>15}")
PY
