#!/usr/bin/env bash
# SAPT continual learning on one GPU (bf16): the whole comparison (SAPT, SAPT w/o ARM, SeqLoRA, and each
# task's LoRA alone for FWT) on the generated sequence reverse -> upper -> sort -> count for seeds 0 and 1,
# then a check that the SAPT bundle stored in the expert store serves what the run measured.
# Needs FOLDER (the SmolLM2 Hugging Face folder; bench/lab/gpu_run.sh makes it and runs this as its `sapt`
# stage). Writes under $OUT/sapt: sapt_compare.{json,md}, sapt_attention.png, log.jsonl, store/, and
# the timings in time.txt. Extra flags for `train sapt --compare` may follow on the command line
# (e.g. --steps 80). H100 time: over 10 minutes for both seeds (560 s reached the last SeqLoRA task of
# seed 1, before the single-task runs that FWT needs: docs/results/h100/sapt/); split it by seed where a
# call is limited to 10 minutes.
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${FOLDER:?set FOLDER to the SmolLM2 Hugging Face folder}"
OUT=${OUT:-/tmp/out}
TASKS=${SAPT_TASKS:-reverse,upper,sort,count}
mkdir -p "$OUT/sapt"
t0=$(date +%s)
python3 -m experts.train sapt --tasks "$TASKS" --model "$FOLDER" --device cuda --dtype bfloat16 \
  --compare --seeds 0,1 --out "$OUT/sapt" --store "$OUT/sapt/store" --name sapt-seq --max-num-seqs 512 "$@"
t1=$(date +%s)
python3 bench/sapt_reload.py --result "$OUT/sapt/sapt_compare.json" --store "$OUT/sapt/store" --name sapt-seq \
  --model "$FOLDER" --device cuda --dtype bfloat16
t2=$(date +%s)
echo "compare $((t1 - t0)) s, reload check $((t2 - t1)) s" | tee "$OUT/sapt/time.txt"
