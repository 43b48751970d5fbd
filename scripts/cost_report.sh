#!/usr/bin/env bash
# Writes a markdown report and a PNG chart of DeepSeek-V3's training-cost claim beside moetrain's
# FLOPs model (default into runs/cost-report/), then prints the table of every public claim in
# configs/claims/ (scripts/claims_table.py), also written to claims.md there.
# Needs build/moetrain (scripts/build.sh) and the venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${MOETRAIN_BIN:-build/moetrain}"
[ -x "$bin" ] || { echo "[cost_report] $bin not found: run scripts/setup.sh && scripts/build.sh" >&2; exit 1; }
python="third_party/venv/bin/python"
"$python" -c "import matplotlib" 2>/dev/null || bash scripts/setup.sh >/dev/null
out="${1:-runs/cost-report}"
"$python" scripts/cost_report.py "$bin" configs/deepseek-v3-671b.yaml "$out"
"$python" scripts/claims_table.py "$bin" > "$out/claims.md"
cat "$out/claims.md"
