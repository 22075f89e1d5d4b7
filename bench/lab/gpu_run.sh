#!/usr/bin/env bash
# GPU benchmark runs (one H100, bf16) as executed through the device machine, which has torch and
# transformers but no gguf package and no network:
#   call 1 carries .carry/p1 (first half of the SmolLM2 GGUF) and copies it to /root;
#   call 2 carries .carry/p2, .whl (the gguf wheel) and .carry/data (ARC-Easy train, for cem) and runs
#   `bash bench/lab/gpu_run.sh STAGE...` with STAGE in: profile engine adapt cem classifier experts table sapt
#   (default: profile engine adapt cem). `classifier` trains the pass-1 classifier expert (next-token)
#   and measures dispatch accuracy of `prompt` and `cls_expert` on held-out questions (.carry/data holds
#   gsm8k/ mbpp/ humaneval/ arc/ math500/ from the benchmark data). `experts` trains the GSM8K, MBPP and
#   ARC-Easy SVF experts (next-token, best checkpoint by validation accuracy) into /root/store and fills
#   the trained tasks' cells of the results table; `table` fills the rest (a later call on the same warm
#   machine: the store and the table live under /root, every finished cell is saved at once, so a call
#   that runs out of time is continued by the next one).
#   `sapt` runs bench/lab/gpu_sapt.sh: the SAPT continual-learning comparison, two seeds, under $OUT/sapt.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /root/gguf.part00 .carry/p2/gguf.part01 > /root/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /root/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/gguf.sha256"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
FOLDER=$(python3 -c "
from pathlib import Path
from engine.loader import gguf_to_hf_folder
print(gguf_to_hf_folder(Path('/root/SmolLM2-135M-Instruct.Q4_1.gguf'), Path.home() / '.cache/t2serve'))" 2>/dev/null | tail -1)
step() { echo "== $*"; "$@" 2>&1 | grep -v -e Warning -e "Loading weights" -e "SVD of" -e clean_up_tokenization | tee -a "$OUT/log.txt"; }
stages=${*:-profile engine adapt cem}
for s in $stages; do
  case $s in
    profile) step python3 bench/profile_step.py --model "$FOLDER" --device cuda --batch 32 --steps 20 ;;
    engine)
      step python3 bench/batching.py --device cuda --model "$FOLDER" --out "$OUT/engine_smollm2_h100.json"
      step python3 bench/batching.py --device cuda --model "$FOLDER" --shape llama3-8b --out "$OUT/engine_llama3_8b_h100.json" ;;
    adapt)
      step python3 bench/adapt.py --device cuda --shape llama3-8b --out "$OUT/adapt_llama3_8b_h100.json"
      step python3 bench/adapt.py --device cuda --model "$FOLDER" --out "$OUT/adapt_smollm2_h100.json" ;;
    classifier)
      step python3 -m experts.train classifier --data .carry/data --model "$FOLDER" --run-dir "$OUT/runs/classifier" \
        --objective next_token --batch-size 256 --micro-batch 128 --epochs 3 --val-every 5
      step python3 bench/dispatch.py --data .carry/data --model "$FOLDER" --device cuda --per-category 50 --timed 2 \
        --classifier "$OUT/runs/classifier/expert.safetensors" --out "$OUT/pass1_h100.json" ;;
    experts)
      for spec in "gsm8k 128 64 40 10 150" "mbpp 64 32 36 6 90" "arc-easy 128 64 54 9 300"; do
        set -- $spec
        step python3 -m experts.train svf --task "$1" --data .carry/data --model "$FOLDER" --run-dir "/root/runs/$1" \
          --store /root/store --objective next_token --batch-size "$2" --micro-batch "$3" --max-steps "$4" \
          --val-every "$5" --val-limit "$6" --max-num-seqs 256
      done
      step timeout 240 python3 -m experts.eval --table --rows base,expert --data .carry/data --model "$FOLDER" \
        --store /root/store --expert experts/builtin/classifier.safetensors --limit 500 --out /root/table || true
      (cd /root && tar -czf "$OUT/results.tgz" table store runs) ;;
    experts-rl)
      # REINFORCE (sampled rollouts, mean baseline) for the tasks whose next-token expert did not beat the
      # base; a new version goes into the store only if a trained step beat step 0 (the base) on
      # validation (--store-when improved). Continues the store and table of .carry/prev.
      [ -d .carry/prev ] && { mkdir -p /root/store /root/table; cp -rn .carry/prev/store/. /root/store/; cp -rn .carry/prev/table/. /root/table/; }
      for spec in "arc-easy 256 128 27 3 300 32" "mbpp 64 64 18 6 90 320"; do
        set -- $spec
        step timeout 280 python3 -m experts.train svf --task "$1" --data .carry/data --model "$FOLDER" \
          --run-dir "/root/runs/rl-$1" --store /root/store --objective reinforce --baseline mean --rollout sample \
          --temperature 0.7 --batch-size "$2" --micro-batch "$3" --max-steps "$4" --val-every "$5" --val-limit "$6" \
          --max-tokens "$7" --max-num-seqs 256 --store-when improved || true
      done
      python3 - <<'PY'
import json, pathlib
p = pathlib.Path("/root/table/table.json")
if p.exists():
    t = json.loads(p.read_text()); t["cells"].pop("expert", None); p.write_text(json.dumps(t))
PY
      step timeout 150 python3 -m experts.eval --table --rows base,expert --data .carry/data --model "$FOLDER" \
        --store /root/store --expert experts/builtin/classifier.safetensors --limit 500 --out /root/table || true
      (cd /root && tar -czf "$OUT/results.tgz" table store runs) ;;
    table)
      step timeout 540 python3 -m experts.eval --table --data .carry/data --model "$FOLDER" --store /root/store \
        --expert experts/builtin/classifier.safetensors --limit 500 --out /root/table || true
      (cd /root && tar -czf "$OUT/results.tgz" table store) ;;
    sapt) step env FOLDER="$FOLDER" OUT="$OUT" bash bench/lab/gpu_sapt.sh ;;
    cem) step python3 bench/cem.py --data .carry/data --model "$FOLDER" --device cuda --generations 50 --out "$OUT/cem_h100.json" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
