#!/usr/bin/env bash
# Regenerates the config reference table in README.md from the key table in csrc/config/config.cpp
# (through `build/moetrain config --reference`). Run after adding or changing a config key.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
table="$(build/moetrain config --reference)"
python3 - "$table" <<'PY'
import pathlib, sys
readme = pathlib.Path("README.md")
text = readme.read_text()
begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
b, e = text.index(begin) + len(begin), text.index(end)
readme.write_text(text[:b] + sys.argv[1] + "\n" + text[e:])
PY
echo "[docs] README.md config reference updated"
