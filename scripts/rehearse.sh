#!/usr/bin/env bash
# The dress rehearsal of the full profile (see scripts/rehearse.py and README "Before you rent a GPU"):
#   bash scripts/rehearse.sh                # small stand-ins on a CPU, sources as local paths and as Hub ids (CI)
#   bash scripts/rehearse.sh --size real    # the same run at real shapes, on a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/rehearse.py "$@"
