#!/usr/bin/env bash
# Create ./.venv and install the course with everything it uses. Safe to re-run; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
# the tested versions of everything (constraints.txt, torch==2.13.0 among them)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    # e.g. PyTorch's CPU wheel index, to avoid a multi-GB CUDA build on a machine without GPU
    $PIP install -q -c constraints.txt torch --index-url "$TORCH_INDEX_URL"
  else
    # on machines that keep a CPU build of this release locally, pip takes it (no CUDA download)
    $PIP install -q -c constraints.txt torch
  fi
fi
$PIP install -q -c constraints.txt -e ".[audio,demo,dev]"
# system tools, apt-get only when missing and running as root: espeak-ng speaks the questions of notebooks 04/05
# (offline TTS); chromium runs the demo's browser test (tests/test_demo_browser.py). Missing, they cost a NOTICE
# here and skips later; under MMPHI_REQUIRE_ALL=1 (CI: nothing may go untested) setup stops with the reason.
missing() {  # $1: the reason
  case "${MMPHI_REQUIRE_ALL:-}" in
    ""|0|false|no) echo "NOTICE: $1" ;;
    *) echo "ERROR: $1 (MMPHI_REQUIRE_ALL=1: nothing may be left out)" >&2; exit 1 ;;
  esac
}
apt_install() {  # $1: command, $2: Debian package, $3: what is lost without it
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"); then
      missing "could not install $2: $3"
    elif ! command -v "$1" >/dev/null 2>&1; then
      missing "$2 was installed but \`$1\` is not on PATH: $3"
    fi
  else
    missing "$2 is missing (sudo apt-get install -y $2): $3"
  fi
}
apt_install espeak-ng espeak-ng "notebooks 04/05 will skip spoken questions"
apt_install chromium chromium "the demo's browser test will be skipped"
.venv/bin/python -c "import torch, transformers, peft, bitsandbytes, helpers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
