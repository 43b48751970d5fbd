#!/usr/bin/env bash
# Installs everything moetrain needs on a fresh Debian 12 machine, idempotently:
# Debian packages for the build and the default corpus, and the torch wheel (LibTorch) in a venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/third_party/venv"
torch_version="2.11.0"

log() { printf '[setup] %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------------
apt_packages=(libyaml-cpp-dev catch2 nlohmann-json3-dev fortunes cmake ninja-build ccache python3-venv)
# protobuf for TensorBoard's event files (logging.tensorboard).
apt_packages+=(libprotobuf-dev protobuf-compiler)
# clang with libFuzzer and the sanitizers, for scripts/fuzz.sh (which scripts/test.sh runs in CI).
apt_packages+=(clang libclang-rt-14-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# --- CUDA toolkit (needed to configure against the CUDA build of LibTorch) ----------------------
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
command -v nvcc >/dev/null 2>&1 || { echo "[setup] nvcc not found: the CUDA 13.0 toolkit must be installed" >&2; exit 1; }

# --- Python environment with the torch wheel (LibTorch) ----------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating third_party/venv"
  python3 -m venv "$venv"
fi
have_torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ "$have_torch" != "$torch_version"* ]]; then
  log "installing torch==$torch_version (a few GB, once)"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version"
else
  log "torch $have_torch present"
fi
# numpy and safetensors for the tools and tests; transformers (the Hugging Face reference in
# scripts/bench_moe_hf.py), tokenizers (scripts/prepare_data.py), matplotlib (scripts/plot_run.py) and
# tensorboard (reads the event files back in the tests, and shows them), peft (loads the LoRA adapters
# that `convert --to peft:DIR` writes, in the tests; 0.21 adapts transformers 5's stacked experts).
py_packages=(numpy safetensors transformers tokenizers matplotlib tensorboard "peft>=0.21")
if ! "$venv/bin/python" -c 'import numpy, safetensors, transformers, tokenizers, matplotlib, tensorboard, peft' 2>/dev/null; then
  log "installing ${py_packages[*]}"
  "$venv/bin/pip" install -q --disable-pip-version-check "${py_packages[@]}"
fi
log "done"
