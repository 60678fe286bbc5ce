#!/usr/bin/env bash
# Create ./.venv and install the course with everything it uses. Safe to re-run; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    # e.g. PyTorch's CPU wheel index, to avoid a multi-GB CUDA build on a machine without GPU
    $PIP install -q torch --index-url "$TORCH_INDEX_URL"
  else
    # pinned: on machines that keep a CPU build of this release locally, pip takes it (no CUDA download)
    $PIP install -q "torch==2.13.0" || $PIP install -q torch
  fi
fi
$PIP install -q -e ".[audio,demo,dev]"
# espeak-ng speaks the questions of notebooks 04/05 (offline TTS); apt-get only when missing and running as root
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) \
      || echo "NOTICE: could not install espeak-ng: notebooks 04/05 will skip spoken questions"
  else
    echo "NOTICE: espeak-ng is missing (sudo apt-get install -y espeak-ng): notebooks 04/05 will skip spoken questions"
  fi
fi
.venv/bin/python -c "import torch, transformers, peft, bitsandbytes, helpers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
