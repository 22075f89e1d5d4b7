#!/usr/bin/env bash
# The GPU benchmark run (one H100, bf16), as executed through the device machine:
#   call 1 carries .carry/p1 (first half of the SmolLM2 GGUF) and copies it to /root;
#   call 2 carries .carry/p2 and .whl (the gguf wheel) and runs this script.
# The machine has torch + transformers but no gguf package and no network.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /root/gguf.part00 .carry/p2/gguf.part01 > /root/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /root/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/gguf.sha256"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
FOLDER=$(python3 -c "
from pathlib import Path
from server.model_loader import gguf_to_hf_folder
print(gguf_to_hf_folder(Path('/root/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/root/cache')))" 2>/dev/null | tail -1)
echo "model folder: $FOLDER"
step() { echo "== $*"; "$@" 2>&1 | grep -v -e Warning -e "Loading weights" | tee -a "$OUT/log.txt"; }
step python3 bench/engine.py --device cuda --model "$FOLDER" --out "$OUT/engine_smollm2_h100.json"
step python3 bench/engine.py --device cuda --model "$FOLDER" --shape llama3-8b --out "$OUT/engine_llama3_8b_h100.json"
if [ -f bench/adapt.py ]; then
  step python3 bench/adapt.py --device cuda --shape llama3-8b --out "$OUT/adapt_llama3_8b_h100.json"
  step python3 bench/adapt.py --device cuda --model "$FOLDER" --out "$OUT/adapt_smollm2_h100.json"
fi
