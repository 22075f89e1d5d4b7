#!/usr/bin/env bash
# Second GPU run: engine benchmarks after grouped admission, and the few-shot CEM wall time.
# Carries .carry/p2 (second GGUF half; the first is copied to /root by a preceding call), .whl, .carry/data.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /root/gguf.part00 .carry/p2/gguf.part01 > /root/SmolLM2-135M-Instruct.Q4_1.gguf
FOLDER=$(python3 -c "
from pathlib import Path
from server.model_loader import gguf_to_hf_folder
print(gguf_to_hf_folder(Path('/root/SmolLM2-135M-Instruct.Q4_1.gguf'), Path.home() / '.cache/t2serve'))" 2>/dev/null | tail -1)
step() { echo "== $*"; "$@" 2>&1 | grep -v -e Warning -e "Loading weights" -e "SVD of" -e clean_up_tokenization | tee -a "$OUT/log.txt"; }
step python3 bench/profile_step.py --model "$FOLDER" --device cuda --batch 32
step python3 bench/engine.py --device cuda --model "$FOLDER" --out "$OUT/engine_smollm2_h100.json"
step python3 bench/engine.py --device cuda --model "$FOLDER" --shape llama3-8b --out "$OUT/engine_llama3_8b_h100.json"
step python3 bench/cem.py --data .carry/data --model "$FOLDER" --device cuda --generations 50 --out "$OUT/cem_h100.json"
