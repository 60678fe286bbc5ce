#!/usr/bin/env bash
# Set up (if needed) and run the unit tests, then execute notebooks 01-05 in the tiny profile under nbmake.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MMPHI_PROFILE=${MMPHI_PROFILE:-tiny} HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
.venv/bin/python -m pytest tests 01_pretrain_phi.ipynb 02_projection.ipynb 03_qlora_instruct.ipynb \
  04_audio_pipeline.ipynb 05_demo.ipynb \
  --nbmake --nbmake-kernel=python3 --nbmake-timeout=1200 -p no:cacheprovider "$@"
