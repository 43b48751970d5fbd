#!/usr/bin/env bash
# Stages the Debian packages the build needs (yaml-cpp, Catch2, nlohmann-json) as extracted files
# under third_party/gpu-debs/root, for the GPU machine, which has no network. Run here, then carry
# third_party/gpu-debs (and data/fortunes) with scripts/gpu_check.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/third_party/gpu-debs"
rm -rf "$dest"
mkdir -p "$dest/debs" "$dest/root"
(cd "$dest/debs" && apt-get download -q libyaml-cpp-dev libyaml-cpp0.7 catch2 nlohmann-json3-dev >/dev/null)
for deb in "$dest"/debs/*.deb; do dpkg -x "$deb" "$dest/root"; done
rm -rf "$dest/debs" "$dest/root/usr/share/doc"
echo "[stage] $(du -sh "$dest" | cut -f1) in third_party/gpu-debs"
