#!/usr/bin/env python3
"""Builds the default training corpus from Debian's `fortunes` package: every English fortune file,
split into single fortunes, shuffled with a fixed seed (so the validation tail is a fair sample of
the whole), joined by blank lines. Usage: make_fortunes_corpus.py OUT.txt [FORTUNES_DIR]"""
import pathlib
import random
import sys

SKIP = {"ascii-art"}  # pictures, not prose


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/usr/share/games/fortunes")
    if not root.is_dir():
        sys.exit(f"[data] {root} not found: install Debian's 'fortunes' package (scripts/setup.sh does)")
    fortunes = []
    for path in sorted(root.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file() or path.name in SKIP:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        fortunes += [f.strip("\n") for f in text.split("\n%\n") if f.strip()]
    random.Random(0).shuffle(fortunes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(fortunes) + "\n", encoding="utf-8")
    print(f"[data] {len(fortunes)} fortunes, {out.stat().st_size / 1e6:.2f} MB -> {out}")


if __name__ == "__main__":
    main()
