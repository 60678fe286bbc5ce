#!/usr/bin/env bash
# The main job: set up (if needed), then execute every notebook in order (tiny profile without a GPU), keeping
# executed copies under outputs/notebooks and figures/metrics under outputs/<profile>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$(.venv/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")}
.venv/bin/python -m helpers.course "$@"
