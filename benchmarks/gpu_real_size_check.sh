#!/usr/bin/env bash
# What issue 20 left for a GPU, in one run of at most ~9 minutes on one H100/H200-class GPU (each step has its own
# time limit and never stops the next). Results (JSON and logs) go to $OUT (the device tool's folder) or
# benchmarks/results, named with the tag:
#   bash benchmarks/gpu_real_size_check.sh [tag]       # tag: a name for the files, default the GPU's (h100, h200)
# 1. Stage 03 at real size, the course's chunked answer-only loss vs liger-kernel's fused linear cross-entropy
#    (benchmarks/qlora_step.py --ways new,fused), the same optimizer batches: seconds per step, MFU, peak memory.
# 2. Batch-1 generation through the fast path (static cache + compiled step; goal >= 300 tokens/s, 293 on an H200).
# 3. The real-size rehearsal of notebooks 02-05 through the notebooks themselves (scripts/rehearse.py --size real,
#    sources as local folders): every stage's time, losses and GPU peak next to the memory planner's.
# Done before (committed): the fp16 checks and the T4-capped stage-03 run (benchmarks/gpu_checks.sh, *_h200 files).
# Needs bitsandbytes, datasets, openai-whisper/faster-whisper and liger-kernel: with WHEELS=<folder of wheels> they are
# installed first, offline (a machine without network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl || echo "installing the wheels failed"
fi
TAG=${1:-$($PY -c "import torch; n = torch.cuda.get_device_name().upper(); print(next((g for g in ('h200', 'h100', 'a100', 'l4', 't4') if g.upper() in n), 'gpu'))")}
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
$PY -c "import bitsandbytes, liger_kernel; print('bitsandbytes', bitsandbytes.__version__, 'liger-kernel ok')" \
  || echo "WARNING: bitsandbytes or liger-kernel missing (set WHEELS=...)"
# 1. ~2.5 min: the random 4-bit Phi-2-sized LLaVA is saved once, then one warm-up and one timed step per way
$PY benchmarks/qlora_step.py --size phi2 --ways new,fused --steps 1 --time-limit 170 \
    --json "$OUT/qlora_step_fused_$TAG.json" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -30 || echo "qlora_step failed"
# 2. ~1.5 min: batch 1, the compiled fast path (first call timed apart) against the dynamic cache
$PY benchmarks/generation_kv_cache.py --size phi2 --batch-size 1 --ways "kv cache,fast" --time-limit 100 \
    --json "$OUT/generation_$TAG.json" 2>&1 | tail -20 || echo "generation failed"
# 3. the rest (~4.5 min): real-size stand-ins, then notebooks 02-05 in the full profile with few steps
timeout 280 $PY scripts/rehearse.py --size real --spelling local --notebooks 02 03 04 05 \
    > "$OUT/rehearsal_real_$TAG.log" 2>&1 || echo "rehearsal stopped (exit $?): see rehearsal_real_$TAG.log"
tail -40 "$OUT/rehearsal_real_$TAG.log" | grep -v "it/s\]\|s/it\]"
cp outputs/rehearsal/real-summary.json "$OUT/rehearsal_real_$TAG.json" 2>/dev/null \
  || echo "no rehearsal summary (see the log): the stages that finished wrote outputs/rehearsal/real-local/full/metrics"
cp -r outputs/rehearsal/real-local/full/metrics "$OUT/rehearsal_real_${TAG}_metrics" 2>/dev/null || true
