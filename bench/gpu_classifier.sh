#!/usr/bin/env bash
# GPU run: train the pass-1 classifier expert (next-token objective) on SmolLM2 and measure dispatch
# accuracy of `prompt` and `cls_expert` on held-out labelled questions. Carries .carry/p2, .whl, .carry/data.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /root/gguf.part00 .carry/p2/gguf.part01 > /root/SmolLM2-135M-Instruct.Q4_1.gguf
M=$(python3 -c "
from pathlib import Path
from server.model_loader import gguf_to_hf_folder
print(gguf_to_hf_folder(Path('/root/SmolLM2-135M-Instruct.Q4_1.gguf'), Path.home() / '.cache/t2serve'))" 2>/dev/null | tail -1)
python3 -m experts.train classifier --data .carry/data --model "$M" --run-dir "$OUT/runs/classifier" \
  --objective next_token --batch-size 256 --micro-batch 128 --epochs 3 --val-every 5 2>&1 | grep -v "Loading weights\|SVD of" | tail -25
python3 bench/pass1.py --data .carry/data --model "$M" --device cuda --per-category 50 --timed 2 \
  --classifier "$OUT/runs/classifier/expert.safetensors" --out "$OUT/pass1_h100.json" 2>&1 | grep -v "Loading weights\|SVD of\|request " | tail -12
