#!/usr/bin/env bash
# Issue 14's GPU measurements in one short run (an H100/H200-class GPU; ~6-7 minutes in all, each step has its own
# time limit and never stops the next). Results: benchmarks/results/*_<gpu>.json, then fill docs/cost_and_scale.md.
#   bash benchmarks/gpu_speed_check.sh [tag]        # tag: a name for the files, default h200
# Needs transformers >= 5.18 (LlavaModel takes the cached vision features as mm_encoder_outputs).
set -uo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-h200}
PY=${PYTHON:-python}
OUT=benchmarks/results
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# transformers < 5.18 ignores the cached vision features (mm_encoder_outputs): with WHEELS=<folder of wheels>
# (e.g. transformers-5.24.0, huggingface_hub >= 1.31, tokenizers >= 0.23.1) install them first, offline
if ! $PY -c "import transformers, sys; v = tuple(int(x) for x in transformers.__version__.split('.')[:2]); sys.exit(v < (5, 18))"; then
  if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install --no-deps --no-index -q "$WHEELS"/*.whl || echo "installing the wheels failed"
  else
    echo "WARNING: transformers < 5.18: stage-02/03 steps would ignore the cached vision features (set WHEELS=...)"
  fi
fi
$PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name())"
# 1. stage 03: old way (batch 4, checkpointing, random micro-batches, full logits) vs new way (length-balanced
#    micro-batches of 16, no checkpointing: what recipe_for_gpu picks for an H200 on these lengths, answer-only
#    loss), the same 128-example optimizer batches; saves the random 4-bit checkpoint for step 2 (~2 min)
$PY benchmarks/qlora_step.py --size phi2 --steps 1 --new-batch 16 --new-checkpointing off --time-limit 200 \
    --json "$OUT/qlora_step_$TAG.json" || echo "qlora_step failed"
# 2. measured peaks vs the memory planner: stage 03 grid (batch 4/8/16, checkpointing on/off, both kernels, both
#    losses; --quick) and stage 02 (~1.5 min)
$PY benchmarks/memory_peaks.py --size phi2 --quick --time-limit 150 --json "$OUT/memory_peaks_$TAG.json" \
    || echo "memory_peaks failed"
# 3. generation: dynamic cache vs the fast path (static cache + CUDA graph) vs stock static, batch 1 and 16,
#    compilation warm-up timed apart (~2.5 min)
$PY benchmarks/generation_kv_cache.py --size phi2 --batch-size 1 16 --ways "kv cache,fast,static" \
    --static-max-batch 1 --time-limit 210 --json "$OUT/generation_$TAG.json" || echo "generation failed"
