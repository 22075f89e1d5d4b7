#!/usr/bin/env bash
# ARC-Easy SVF experts by REINFORCE on one GPU: several recipes trained at once (a 135M model leaves the GPU
# mostly idle, so they share it), each scored with the base on the whole test split (95% Wilson intervals).
#
#   FOLDER=HF_FOLDER DATA=DATA_ROOT OUT=DIR bash bench/lab/gpu_arc.sh
#
# ARC_RUNS: "TARGETS:LR:KL_COEF[:ROLLOUT] ..." (ROLLOUT: greedy, or a temperature to sample at; default greedy,
# default four recipes); ARC_STEPS optimizer steps of 256 questions
# (default 60, about 7 epochs of the 2,251 training questions); ARC_LIMIT_S seconds for all training;
# ARC_BATCH, ARC_VAL_LIMIT, ARC_EVAL_LIMIT shrink a run for a smoke test on a CPU. ARC_TASK: arc-easy-text
# (default: the choices answered in their own words) or arc-easy (by letter).
# Runs go to $OUT/arc/RUN (log.jsonl, curves.png, expert.safetensors), scores to $OUT/arc/eval/RUN. A run cut
# short by the time limit resumes from its last step's checkpoint when the script runs again on the same OUT.
set -uo pipefail
: "${FOLDER:?a Hugging Face folder}" "${DATA:?a data root holding arc/}"
OUT=${OUT:-/tmp/out}
TASK=${ARC_TASK:-arc-easy-text}
STEPS=${ARC_STEPS:-60}
LIMIT=${ARC_LIMIT_S:-480}
BATCH=${ARC_BATCH:-256}
VAL=${ARC_VAL_LIMIT:+--val-limit $ARC_VAL_LIMIT}
EVAL=${ARC_EVAL_LIMIT:+--limit $ARC_EVAL_LIMIT}
mkdir -p "$OUT/arc/eval"
pids=()
for spec in ${ARC_RUNS:-mlp:5e-3:0:greedy mlp:2e-3:0:greedy all:5e-3:0:greedy mlp:5e-3:0:0.5}; do
    IFS=: read -r targets lr kl rollout <<<"$spec"
    rollout=${rollout:-greedy}
    if [ "$rollout" = greedy ]; then how=(--rollout greedy); name="$targets-lr$lr-kl$kl-greedy"
    else how=(--rollout sample --temperature "$rollout"); name="$targets-lr$lr-kl$kl-t$rollout"; fi
    timeout -k 10 "$LIMIT" python3 -m experts.train svf --task "$TASK" --data "$DATA" --model "$FOLDER" \
        --run-dir "$OUT/arc/$name" --targets "$targets" --lr "$lr" --kl-coef "$kl" --objective reinforce \
        --baseline mean "${how[@]}" --batch-size "$BATCH" --micro-batch 128 $VAL \
        --max-steps "$STEPS" --epochs 20 --val-every 10 --max-tokens 32 --max-num-seqs 256 --resume \
        >>"$OUT/arc/$name.log" 2>&1 &
    pids+=($!)
    echo "started $name (pid $!)"
done
for p in "${pids[@]}"; do wait "$p"; echo "pid $p rc=$?"; done
grep -h "\[val\]" "$OUT"/arc/*.log | tail -n 40
score() {  # NAME STRATEGY [FLAGS...]
    local name=$1 strategy=$2
    shift 2
    python3 -m experts.eval --task "$TASK" --strategy "$strategy" --data "$DATA" --model "$FOLDER" \
        --out "$OUT/arc/eval/$name" $EVAL "$@" >"$OUT/arc/eval/$name.log" 2>&1
    tail -n 3 "$OUT/arc/eval/$name.log"
}
score base base
for d in "$OUT"/arc/*/; do
    name=$(basename "$d")
    [ -f "$d/expert.safetensors" ] || continue
    score "$name" expert --targets "${name%%-*}" --expert "$TASK=$d/expert.safetensors" &
done
wait
