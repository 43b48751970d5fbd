#!/usr/bin/env bash
# The fine-tuning chain end to end on a CPU, in a few minutes: a chat dataset and a tiny chat-tuned
# Qwen3-MoE made here, then full and LoRA fine-tunes, each measured on held-out chats (assistant loss,
# exact match) and exported to transformers, whose greedy tokens must be moetrain's.
#   scripts/finetune_demo.sh        (everything under runs/finetune-demo/, replaced each time)
set -euo pipefail
cd "$(dirname "$0")/.."

py=third_party/venv/bin/python
bin=build/moetrain
out=runs/finetune-demo
logs=$out/logs
n_train=4000        # target-task chats trained on
n_heldout=200       # held-out chats: their numbers occur in no training chat
seq_len=128         # a chat is about 20 tokens: six or so packed per sequence
new_tokens=8        # the longest answer (six digits) and its <|im_end|>, plus one
steps=250           # each fine-tune: about six passes over the training chats
lora_rank=16        # on every weight of attention and the experts (alpha = 2 x rank)

# One thread per process: a 0.9M-parameter model gains little from two, and on a busy machine two
# threads made training 8x slower than one (1.8K against 14K tokens/s, measured here).
export OMP_NUM_THREADS=1

die() { echo "[finetune_demo] $*" >&2; exit 1; }
stage() { echo; echo "== $* ($((SECONDS))s)"; }
# Runs a step with its whole output in logs/NAME.log; a failure is one line: the step, the log's
# last line (moetrain's and prepare_data's errors are one line) and where the log is.
quiet() {
  local name=$1; shift
  "$@" > "$logs/$name.log" 2>&1 || die "$name failed: $(tail -n 1 "$logs/$name.log") (log: $logs/$name.log)"
}

[ -x "$py" ] || die "no Python at $py: run scripts/setup.sh first"
if [ ! -x "$bin" ]; then
  echo "[finetune_demo] no $bin: building it"
  bash scripts/build.sh --target moetrain || die "scripts/build.sh --target moetrain failed"
fi
rm -rf "$out"
mkdir -p "$logs" "$out/configs" "$out/results"
SECONDS=0

stage "1. chats: the target task (unit conversions) with held-out numbers, and the base's task"
$py scripts/finetune_demo.py data --out "$out/chats" --n-train $n_train --n-heldout $n_heldout \
  || die "making the chats failed"

stage "2. a tiny chat-tuned base"
$py scripts/finetune_demo.py base --out "$out/init" --corpus "$out/chats/base.jsonl" "$out/chats/target.jsonl" \
  2> "$logs/init.log" || die "making the tokenizer and model failed: $(tail -n 1 "$logs/init.log")"
tokenizer=$out/init   # the tokenizer stays here; exports hold weights and config.json only
# prepare_data's validation split is the last records: the held-out chats, written last.
quiet prepare-target $py scripts/prepare_data.py --tokenizer "$tokenizer" --input "$out/chats/target.jsonl" \
  --out "$out/data/target" --val-fraction "$($py -c "print($n_heldout / ($n_train + $n_heldout))")"
quiet prepare-base $py scripts/prepare_data.py --tokenizer "$tokenizer" --input "$out/chats/base.jsonl" \
  --out "$out/data/base"
grep "^\[prepare_data\] wrote" "$logs/prepare-target.log"
grep -q "val.bin: .*, $n_heldout documents" "$logs/prepare-target.log" \
  || die "the held-out split (val.bin) does not hold the $n_heldout held-out chats"

# One config per run: the fine-tuning template's keys, sized for a 0.9M-parameter model on a CPU.
write_config() {  # NAME INIT_FROM DATA STEPS LR MIN_LR [LORA_RANK]
  local lora=""
  [ -z "${7:-}" ] || lora="  lora:
    rank: $7
    alpha: $((2 * $7))
    dropout: 0.0
    targets: [q, k, v, o, experts]"
  cat > "$out/configs/$1.yaml" <<EOF
# scripts/finetune_demo.sh: $1 (written by the script; configs/finetune-qwen3-moe.yaml's keys)
run:
  name: $1
  out_dir: $out/runs/$1
  seed: 1337
  device: cpu
  dtype: fp32
model:
  init_from: hf:$2
  max_seq_len: $seq_len
  moe:
    capacity_factor: ~
    aux_loss_coef: 0.001
data:
  dir: $3
  seq_len: $seq_len
  packing: documents
optim:
  lr: $5
  min_lr: $6
  warmup_steps: 10
  decay_steps: $4
  weight_decay: 0.0
  grad_clip: 1.0
train:
  steps: $4
  global_batch_size: 16
  micro_batch_size: 16
  log_every: 25
  eval_every: $4
  eval_batches: 4
$lora
checkpoint:
  every: $4
  keep_last: 1
EOF
}
train() {  # NAME: trains from configs/NAME.yaml, prints its progress lines
  quiet "train-$1" $bin train --config "$out/configs/$1.yaml"
  grep -E "^(step|done)" "$logs/train-$1.log" | sed "s/^/  [$1] /"
}

# Chat-tuning from random weights: the base learns ChatML and to answer with the question's number.
write_config base "$out/init" "$out/data/base" 200 3.0e-3 3.0e-4
train base
quiet export-base $bin convert --from "$out/runs/base" --to "hf:$out/models/base"
quiet accuracy-base-task $py scripts/finetune_demo.py accuracy --name "base on its own task" \
  --model "$out/models/base" --tokenizer "$tokenizer" --heldout "$out/chats/base-heldout.jsonl" \
  --result "$out/results/base-task.json" --max-new-tokens $new_tokens
grep "^\[accuracy\]" "$logs/accuracy-base-task.log"

stage "3. fine-tunes of the base on the target task"
# The same steps and data for both; LoRA's few weights take a 10x larger learning rate.
write_config full "$out/models/base" "$out/data/target" $steps 1.0e-3 1.0e-4
train full
models="base full"
# The LoRA leg runs where this build knows train.lora (LoRA came to main after this script).
if lora_check=$($bin config --config "$out/configs/full.yaml" --set train.lora.rank=8 2>&1 > /dev/null); then
  write_config lora "$out/models/base" "$out/data/target" $steps 1.0e-2 1.0e-3 $lora_rank
  train lora
  models="base full lora"
  echo "  checkpoints: full $(du -sh "$out/runs/full/ckpt" | cut -f1), LoRA $(du -sh "$out/runs/lora/ckpt" | cut -f1)" \
    "(the adapters and their optimizer state, over the base they name)"
elif [[ $lora_check == *"unknown key 'train.lora"* ]]; then
  echo "  [lora] skipped: this $bin has no LoRA ($lora_check)"
else
  die "checking for train.lora failed: $lora_check"
fi

stage "4-5. exports, held-out loss, exact match, and transformers against moetrain generate"
for m in $models; do
  if [ "$m" != base ]; then
    # A LoRA run holds adapters over its base: convert writes the merged weights.
    merge=(); [ "$m" != lora ] || merge=(--merge-lora)
    quiet "export-$m" $bin convert "${merge[@]}" --from "$out/runs/$m" --to "hf:$out/models/$m"
  fi
  quiet "eval-$m" $bin eval --checkpoint "$out/runs/$m" --data "$out/data/target" --packing documents \
    --seq-len $seq_len --json
  $py scripts/finetune_demo.py eval-result --name $m --result "$out/results/$m.json" --log "$logs/eval-$m.log"
  quiet "accuracy-$m" $py scripts/finetune_demo.py accuracy --name $m --model "$out/models/$m" \
    --tokenizer "$tokenizer" --heldout "$out/chats/heldout.jsonl" --result "$out/results/$m.json" \
    --max-new-tokens $new_tokens
  grep "^\[accuracy\]" "$logs/accuracy-$m.log"
  quiet "agree-$m" $py scripts/finetune_demo.py agree --name $m --model "$out/models/$m" --tokenizer "$tokenizer" \
    --checkpoint "$out/runs/$m" --moetrain $bin --heldout "$out/chats/heldout.jsonl" \
    --result "$out/results/$m.json" --max-new-tokens $new_tokens --prompts 5
  grep "^\[agree\]" "$logs/agree-$m.log"
done

stage "6. held-out results ($n_heldout chats; base = chat-tuned, before fine-tuning)"
$py scripts/finetune_demo.py table "base (before)=$out/results/base.json" "full fine-tune=$out/results/full.json" \
  "LoRA fine-tune (rank $lora_rank)=$out/results/lora.json"
echo
echo "finetune_demo: done in ${SECONDS}s; runs, exports, configs and logs under $out/"
