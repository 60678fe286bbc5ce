#!/usr/bin/env bash
# The GPU checks of the fp16 path that a T4 takes (helpers.models.precision), in one run of about 6-8 minutes on one big GPU.
# Results (JSON and logs) go to $OUT (the device tool's folder) or benchmarks/results. Run from the repository root:
#   bash benchmarks/gpu_checks.sh
# 1. The course's stages 01-03 through Trainer in fp16 (gradient scaler, 4-bit layers computing in fp16, Phi's
#    attention scores in fp32, the export stored and reloaded in fp16) on the tiny world: learning against the blind
#    baseline, and the precision tests, on CUDA.
# 2. Stage 03 at real size (Phi-2-sized random LLaVA in 4-bit + LoRA r=128) with a T4's recipe, in fp16, the process
#    limited to a T4's memory: does it fit, do the losses stay finite, how many steps does the scaler skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
MMPHI_PRECISION=fp16 timeout 300 $PY -m pytest -q -s -p no:cacheprovider tests/test_precision.py \
  tests/test_learning_from_images.py 2>&1 | grep -v "it/s\]\|s/it\]" | tee "$OUT/gpu_fp16_tests.log" | tail -40
MMPHI_PRECISION=fp16 $PY benchmarks/qlora_step.py --size phi2 --as-gpu T4 --ways new --steps 2 --time-limit 240 \
  --json "$OUT/qlora_step_t4_fp16_h200.json" 2>&1 | tail -40
