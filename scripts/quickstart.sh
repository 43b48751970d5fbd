#!/usr/bin/env bash
# From nothing to a trained MoE and a sample: set-up, build the moetrain binary (not the tests, which
# are scripts/test.sh's), prepare Debian's fortunes as a byte-level corpus, train configs/tiny.yaml on
# the CPU (resuming if an earlier quickstart was interrupted), then sample from the final checkpoint.
# Extra arguments go to `moetrain train` (e.g. --set ...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh --target moetrain
if [ ! -f data/fortunes/train.bin ] || [ ! -f data/fortunes/val.bin ]; then
  python3 scripts/make_fortunes_corpus.py data/fortunes/corpus.txt
  build/moetrain prepare-data --text data/fortunes/corpus.txt --out data/fortunes
fi
start=$(date +%s)
build/moetrain train --config configs/tiny.yaml --resume auto "$@"
echo "[quickstart] training took $(( $(date +%s) - start ))s; metrics in runs/tiny/metrics.jsonl"
echo "[quickstart] a sample from runs/tiny (temperature 0.8, top-k 40):"
echo "----------------------------------------------------------------------------------------"
build/moetrain generate --checkpoint runs/tiny --prompt "The meaning of life is" --max-new-tokens 400 \
  --temperature 0.8 --top-k 40 --seed 7
echo "----------------------------------------------------------------------------------------"
