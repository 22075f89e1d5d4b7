#!/usr/bin/env bash
# Beyond one GPU, on a machine with 2 or more (after `bash bench/lab/gpu_vllm.sh install`):
#   tp        bench/tp_check.py: vLLM at tensor parallel size TP (default 2) against 1 GPU, a model with
#             Llama-3-8B's shapes (LAYERS, default 32), mixed adaptations (rows), greedy tokens
#   replicas  bench/replicas.py: one replica per GPU (DEVICES, default cuda:0,cuda:1) sharing one expert
#             store behind HAProxy, against one replica alone; goal >= 1.8x with two
#   bash bench/lab/gpu_multi.sh [tp] [replicas]      (default: both; results under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/root/bundle/haproxy:$PATH
FOLDER=${FOLDER:-$(cat /root/smollm2_folder.txt 2>/dev/null)}
[ -n "$FOLDER" ] && [ -f "$FOLDER/config.json" ] || { echo "FOLDER is not a Hugging Face folder: '$FOLDER'"; exit 2; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
rc=0
for s in ${*:-tp replicas}; do
    case $s in
        tp) python3 bench/tp_check.py --tp "${TP:-2}" --layers "${LAYERS:-32}" --tokenizer "$FOLDER" \
                --out "$OUT/tp_check.json" 2>&1 | tee "$OUT/tp_check.log" | grep -v -e "it/s]" -e INFO || rc=1 ;;
        replicas) python3 bench/replicas.py --model "$FOLDER" --devices "${DEVICES:-cuda:0,cuda:1}" \
                --out "$OUT/replicas_gpu.json" 2>&1 | tee "$OUT/replicas_gpu.log" | tail -8 || rc=1 ;;
        *) echo "unknown stage $s"; exit 2 ;;
    esac
done
exit $rc
