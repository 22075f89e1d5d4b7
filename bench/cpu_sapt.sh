#!/usr/bin/env bash
# SAPT continual learning on the CPU (bf16 matmuls), sized for 2 cores: the whole comparison (SAPT, SAPT
# without ARM, SeqLoRA, each task's LoRA alone for FWT) on the generated sequence
# reverse -> upper -> sort -> count for seeds 0 and 1 (50 steps of 16 examples per task), then a check that
# the SAPT bundle put in the expert store serves what the run measured. About 40 minutes on 2 cores.
# MODEL: a Hugging Face folder or .gguf (default: the embedded SmolLM2). Writes under $OUT/sapt:
# sapt_compare.{json,md}, sapt_attention.png, log.jsonl, store/, time.txt. Extra flags for
# `train sapt --compare` may follow on the command line.
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
TASKS=${SAPT_TASKS:-reverse,upper,sort,count}
model=()
[[ -n "${MODEL:-}" ]] && model=(--model "$MODEL")
mkdir -p "$OUT/sapt"
t0=$(date +%s)
"$PY" -m experts.train sapt --tasks "$TASKS" "${model[@]}" --device cpu --dtype bfloat16 --compare --seeds 0,1 \
  --steps 50 --batch-size 16 --micro-batch 16 --generator-steps 30 --val-limit 50 --test-limit 100 \
  --out "$OUT/sapt" --store "$OUT/sapt/store" --name sapt-seq "$@"
t1=$(date +%s)
"$PY" bench/sapt_reload.py --result "$OUT/sapt/sapt_compare.json" --store "$OUT/sapt/store" --name sapt-seq \
  "${model[@]}" --device cpu --dtype bfloat16
t2=$(date +%s)
echo "compare $((t1 - t0)) s, reload check $((t2 - t1)) s" | tee "$OUT/sapt/time.txt"
