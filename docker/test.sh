#!/usr/bin/env bash
# Builds the CPU image and checks it for real with podman; no Docker engine or image registry needed.
#   1. podman and runc (installed when missing); a containers.conf without default ulimits
#   2. a Debian bookworm base image with Python, debootstrapped and imported once (kept between runs)
#   3. docker/Dockerfile built, torch's CPU wheel staged from $T2_TEST_WHEELS when one is there
#   4. a container: healthy (cold start timed), non-root, caches baked in, keys enforced, a completion
#   5. an expert uploaded through POST /v1/experts, listed in /v1/models and changing the output;
#      after a restart still listed and giving the same output
#   6. SIGTERM during a streaming request: the stream ends, exit code 0, no traceback in the logs
#   7. a new container on the same volume still serves the expert
#   8. with T2_TEST_CUDA=1: docker/Dockerfile.cuda built as far as a machine without a registry allows
#      (a Python-less Debian base stands in for nvidia/cuda; PyPI's CUDA 13.0 torch), started on the CPU
#      in bf16, a completion, a clean stop
#   9. everything made here removed (containers, volume, images, staged wheel); the base images stay
# Ends with the image size, the cold start to healthy and the total time.
#
# Settings (environment): T2_TEST_BASE (base image, default localhost/t2serve-base:bookworm),
# T2_TEST_WHEELS (folder with a torch CPU wheel, default /opt/wheels), T2_TEST_PIP_CERT (CA bundle for
# pip inside the build, default pip's configured cert), T2_TEST_LAYERS=1 (keep build layers between
# runs, for iterating), T2_TEST_KEEP=1 (keep the images and the containers, for debugging),
# T2_TEST_IMAGE (check this image instead of building one; it is kept), T2_TEST_CUDA=1 (step 8).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${T2_TEST_BASE:-localhost/t2serve-base:bookworm}
WHEELS=${T2_TEST_WHEELS:-/opt/wheels}
RUN_ID=t2serve-test-$$
IMAGE=${T2_TEST_IMAGE:-localhost/$RUN_ID:cpu}
CUDA_IMAGE=localhost/$RUN_ID:cuda
VOLUME=$RUN_ID-experts
KEY=test-inference-key
ADMIN_KEY=test-admin-key
BASE_MODEL=SmolLM2-135M-Instruct
EXPERT=docker-test-expert
PROMPT="The three most important things about deploying software are"
WORK=$(mktemp -d /var/tmp/$RUN_ID.XXXX)
CONTAINERS=()
IMAGES=()
STAGED=""
T0=$SECONDS

log() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}
pm() { podman --runtime runc "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ]; then
        for c in "${CONTAINERS[@]}"; do
            echo "--- logs of $c (last 60 lines, /health polls left out)"
            pm logs "$c" 2>&1 | grep -v '"GET /health' | tail -60
        done
    fi
    if [ "${T2_TEST_KEEP:-0}" != 1 ]; then
        for c in "${CONTAINERS[@]}"; do pm rm -f -v -t 0 "$c" >/dev/null 2>&1; done
        pm volume rm -f "$VOLUME" >/dev/null 2>&1
        for i in "${IMAGES[@]}"; do pm rmi -f "$i" >/dev/null 2>&1; done
    fi
    [ -n "$STAGED" ] && rm -f "$STAGED"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. podman ----------------------------------------------------------------------------------------
apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

log "podman"
command -v podman >/dev/null && command -v runc >/dev/null || apt_install podman runc
if [ -z "${CONTAINERS_CONF:-}" ]; then
    # The default ulimits of containers.conf cannot be applied here.
    printf '[containers]\ndefault_ulimits = []\n' >"$WORK/containers.conf"
    export CONTAINERS_CONF=$WORK/containers.conf
fi
pm --version

# --- 2. base image --------------------------------------------------------------------------------------
make_base() { # image [packages]: a minimal Debian bookworm, imported once
    local image=$1 packages=${2:-} root=$WORK/rootfs
    log "base image $image"
    if pm image exists "$image"; then
        echo "cached"
        return
    fi
    command -v debootstrap >/dev/null || apt_install debootstrap
    debootstrap --variant=minbase ${packages:+--include=$packages} bookworm "$root" \
        "${T2_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | pm import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
    rm -rf "$root"
}
make_base "$BASE" python3,python3-venv,ca-certificates,bubblewrap,libseccomp2

# --- 3. build -------------------------------------------------------------------------------------------
log "the two Dockerfiles share their body"
shared() { sed -n '/^# ---- from here on the same/,$p' "$1"; }
[ -n "$(shared docker/Dockerfile)" ] || fail "docker/Dockerfile has no shared-body marker"
diff <(shared docker/Dockerfile) <(shared docker/Dockerfile.cuda) || fail "Dockerfile and Dockerfile.cuda differ below the marker"

PIP_SECRET=()
cert=${T2_TEST_PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
if [ -f "$cert" ]; then PIP_SECRET=(--secret "id=pipcert,src=$cert"); fi

build() { # dockerfile image [build args...]
    local dockerfile=$1 image=$2
    shift 2
    IMAGES+=("$image")
    # --format docker keeps HEALTHCHECK (OCI image configs have no field for it).
    pm build --format docker --network host --force-rm \
        --layers="$([ "${T2_TEST_LAYERS:-0}" = 1 ] && echo true || echo false)" \
        -f "$dockerfile" "${PIP_SECRET[@]}" "$@" -t "$image" .
}

BUILD_S=0
if [ -n "${T2_TEST_IMAGE:-}" ]; then
    log "image $IMAGE (given)"
else
    log "build $IMAGE"
    torch_args=()
    wheel=$(ls "$WHEELS"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        # download.pytorch.org may be unreachable: install the staged wheel, its dependencies from PyPI.
        STAGED=docker/wheels/$(basename "$wheel")
        ln -f "$wheel" "$STAGED" 2>/dev/null || cp "$wheel" "$STAGED"
        torch_args=(--build-arg "TORCH_SPEC=/tmp/wheels/$(basename "$wheel")" --build-arg "TORCH_INDEX=https://pypi.org/simple")
        echo "torch from the staged $(basename "$wheel")"
    fi
    t=$SECONDS
    build docker/Dockerfile "$IMAGE" --build-arg "BASE_IMAGE=$BASE" "${torch_args[@]}"
    BUILD_S=$((SECONDS - t))
fi
SIZE=$(pm image inspect --format '{{.Size}}' "$IMAGE")

# --- 4. start -------------------------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT

start() { # name image [run args...]: a container on the expert volume, waited for until healthy
    local name=$1 image=$2 t0
    shift 2
    CONTAINERS+=("$name")
    t0=$(date +%s.%N)
    # No healthcheck timer (podman runs it from systemd, absent here): the test runs the check itself.
    pm run -d --name "$name" -p "127.0.0.1:$PORT:8000" -v "$VOLUME:/var/lib/t2serve/experts" \
        -e T2_API_KEY=$KEY -e T2_ADMIN_API_KEY=$ADMIN_KEY --no-healthcheck "$@" "$image" >/dev/null
    wait_healthy "$name" "$t0"
}

wait_healthy() { # name start-time: sets COLD_S
    local name=$1 t0=$2 code
    for _ in $(seq 600); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health" || true)
        [ "$code" = 200 ] && break
        [ "$(pm inspect --format '{{.State.Running}}' "$name")" = true ] || fail "$name exited before it was healthy"
        if logs_have "$name" "/health stays 503"; then fail "$name failed to start"; fi
        sleep 0.25
    done
    [ "$code" = 200 ] || fail "$name not healthy after 150 s"
    COLD_S=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0")
    echo "$name healthy ${COLD_S} s after start"
}

stop() { # name: SIGTERM, then exit code 0, an orderly uvicorn shutdown and no traceback
    pm stop -t 60 "$1" >/dev/null
    [ "$(pm inspect --format '{{.State.ExitCode}}' "$1")" = 0 ] || fail "$1: exit code after stop"
    check_logs "$1"
}

check_logs() { # name
    logs_have "$1" "Finished server process" || fail "$1: no orderly uvicorn shutdown in the logs"
    if logs_have "$1" Traceback; then fail "$1: a traceback in the logs"; fi
}

logs_have() { # name pattern (the logs go through a file: grep -q would cut a pipe from podman short)
    pm logs "$1" >"$WORK/logs" 2>&1
    grep -q "$2" "$WORK/logs"
}

http() { # method path key [curl args...]: prints the body, then the status code on the last line
    local method=$1 path=$2 key=$3
    shift 3
    curl -sS -X "$method" -w '\n%{http_code}' -H "Authorization: Bearer $key" "$@" "$URL$path"
}

expect() { # status response: checks the status line, prints the body
    local want=$1 got body
    got=$(tail -n1 <<<"$2")
    body=$(sed '$d' <<<"$2")
    [ "$got" = "$want" ] || fail "expected HTTP $want, got $got: $body"
    printf '%s' "$body"
}

json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

complete() { # model: greedy completion text of PROMPT
    expect 200 "$(http POST /v1/completions $KEY -H 'Content-Type: application/json' \
        -d "{\"model\": \"$1\", \"prompt\": \"$PROMPT\", \"max_tokens\": 24, \"temperature\": 0}")" |
        json 'd["choices"][0]["text"]'
}

models() { expect 200 "$(http GET /v1/models $KEY)" | json '" ".join(m["id"] for m in d["data"])'; }

log "start"
start "$RUN_ID-a" "$IMAGE"
COLD_START=$COLD_S
mapfile -d '' -t check < <(pm image inspect --format '{{json .HealthCheck}}' "$IMAGE" |
    python3 -c 'import json, sys; t = json.load(sys.stdin)["Test"]; assert t[0] == "CMD"; print("\0".join(t[1:]), end="")') ||
    fail "the image has no HEALTHCHECK"
pm exec "$RUN_ID-a" "${check[@]}" || fail "the image's HEALTHCHECK fails on a healthy server"
[ "$(pm exec "$RUN_ID-a" id -u)" = 10001 ] || fail "the server does not run as uid 10001"
logs_have "$RUN_ID-a" "SVD factors of .* loaded from" || fail "SVD factors were not loaded from the image"
if logs_have "$RUN_ID-a" "converting"; then fail "the model was converted at start, not at build time"; fi

log "completion"
expect 401 "$(curl -sS -w '\n%{http_code}' -H 'Content-Type: application/json' \
    -d "{\"model\": \"$BASE_MODEL\", \"prompt\": \"hi\"}" "$URL/v1/completions")" >/dev/null
BASE_TEXT=$(complete "$BASE_MODEL")
[ -n "$BASE_TEXT" ] || fail "empty completion"
echo "base: $BASE_TEXT"
curl -sSf "$URL/metrics" >"$WORK/metrics" && grep -q '^t2_' "$WORK/metrics" || fail "/metrics has no t2_ series"
for shipped in gsm8k mbpp arc-easy-text mini-mul mini-add mini-last mini-bracket; do  # experts/builtin/, installed at first start
    [[ " $(models) " == *" $shipped "* ]] || fail "shipped expert $shipped not in /v1/models"
done
# The shipped mini-mul expert answers products of two digits (100% of 500 test questions, base 27%).
MUL=$(expect 200 "$(http POST /v1/chat/completions $KEY -H 'Content-Type: application/json' \
    -d '{"model": "mini-mul", "messages": [{"role": "user", "content": "What is 7 times 8?"}], "max_tokens": 24,
         "temperature": 0}')" | json 'd["choices"][0]["message"]["content"]')
echo "mini-mul: $MUL"
[[ "$MUL" == *56* ]] || fail "the shipped mini-mul expert did not answer 7 times 8"

# --- 5. expert ------------------------------------------------------------------------------------------
log "expert upload"
# An SVF expert for SmolLM2-135M's MLP matrices (30 layers; every one has 576 singular values), with
# random z: greedy text visibly changes.
python3 - "$WORK/expert.json" "$EXPERT" <<'EOF'
import json, random, sys
rng = random.Random(0)
z = {f"model.layers.{i}.mlp.{p}": [round(rng.gauss(0.0, 2.0), 3) for _ in range(576)]
     for i in range(30) for p in ("gate_proj", "up_proj", "down_proj")}
json.dump({"name": sys.argv[2], "kind": "svf", "description": "docker/test.sh", "z": z}, open(sys.argv[1], "w"))
EOF
expect 403 "$(http POST /v1/experts $KEY -H 'Content-Type: application/json' --data-binary "@$WORK/expert.json")" >/dev/null
expect 200 "$(http POST /v1/experts $ADMIN_KEY -H 'Content-Type: application/json' \
    --data-binary "@$WORK/expert.json")" | json 'd["id"], d["version"], d["status"]'
[[ " $(models) " == *" $EXPERT "* ]] || fail "$EXPERT not in /v1/models"
EXPERT_TEXT=$(complete "$EXPERT")
echo "expert: $EXPERT_TEXT"
[ "$EXPERT_TEXT" != "$BASE_TEXT" ] || fail "the expert's greedy text equals the base model's"

log "restart"
t0=$(date +%s.%N)
pm restart -t 60 "$RUN_ID-a" >/dev/null
wait_healthy "$RUN_ID-a" "$t0"
[[ " $(models) " == *" $EXPERT "* ]] || fail "$EXPERT not in /v1/models after a restart"
[ "$(complete "$EXPERT")" = "$EXPERT_TEXT" ] || fail "the expert gives other text after a restart"
echo "still listed and used"

# --- 6. SIGTERM -----------------------------------------------------------------------------------------
log "SIGTERM during a streaming request"
curl -sS -N -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$EXPERT\", \"prompt\": \"$PROMPT\", \"max_tokens\": 200, \"temperature\": 0, \"stream\": true}" \
    "$URL/v1/completions" >"$WORK/stream.txt" 2>"$WORK/stream.err" &
stream_pid=$!
for _ in $(seq 200); do grep -q '^data: {' "$WORK/stream.txt" && break; sleep 0.1; done
grep -q '^data: {' "$WORK/stream.txt" || fail "no streamed chunk within 20 s"
! grep -q '^data: \[DONE\]' "$WORK/stream.txt" || fail "the stream ended before SIGTERM: raise max_tokens"
pm kill --signal TERM "$RUN_ID-a" >/dev/null
before=$(grep -c '^data: {' "$WORK/stream.txt" || true)
exit_code=$(timeout 60 podman --runtime runc wait "$RUN_ID-a") || fail "still running 60 s after SIGTERM"
wait "$stream_pid" || true
after=$(grep -c '^data: {' "$WORK/stream.txt" || true)
# uvicorn lets a request in flight finish (up to 30 s), then cancels it; either ends the stream.
if grep -q '^data: \[DONE\]' "$WORK/stream.txt"; then ending="finished with [DONE]"; else ending="cut off"; fi
echo "exit code $exit_code; $before chunks streamed before SIGTERM, $after in all: the stream $ending"
[ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM"
check_logs "$RUN_ID-a"

# --- 7. a new container on the same volume -----------------------------------------------------------------
log "new container, same expert volume"
pm rm "$RUN_ID-a" >/dev/null
start "$RUN_ID-b" "$IMAGE"
[ "$(complete "$EXPERT")" = "$EXPERT_TEXT" ] || fail "the expert is gone or different in a new container"
stop "$RUN_ID-b"
echo "expert served by a new container"

# --- 8. CUDA image --------------------------------------------------------------------------------------
CUDA_NOTE=""
if [ "${T2_TEST_CUDA:-0}" = 1 ]; then
    make_base "$BASE-nopython"
    log "build $CUDA_IMAGE (docker/Dockerfile.cuda; a Python-less Debian stands in for nvidia/cuda)"
    t=$SECONDS
    build docker/Dockerfile.cuda "$CUDA_IMAGE" --build-arg "BASE_IMAGE=$BASE-nopython" \
        --build-arg "TORCH_INDEX=https://pypi.org/simple"
    cuda_build_s=$((SECONDS - t))
    cuda=$(pm run --rm --no-healthcheck --entrypoint python "$CUDA_IMAGE" -c 'import torch; print(torch.version.cuda)')
    [ "$cuda" != None ] || fail "the CUDA image has a CPU-only torch"
    start "$RUN_ID-cuda" "$CUDA_IMAGE" -e T2_ENGINE=native -e T2_DTYPE=bfloat16 -e T2_ADAPT_TARGETS=none
    echo "bf16 on the CPU: $(complete "$BASE_MODEL")"
    stop "$RUN_ID-cuda"
    CUDA_NOTE=$(printf '\nCUDA image (torch CUDA %s, Debian base): %s MB (build %d s)' "$cuda" \
        "$(($(pm image inspect --format '{{.Size}}' "$CUDA_IMAGE") / 1000000))" "$cuda_build_s")
fi

log "PASS"
printf 'image %s: %s MB (build %d s)\ncold start to healthy: %s s%s\ntotal: %d s\n' \
    "$IMAGE" "$((SIZE / 1000000))" "$BUILD_S" "$COLD_START" "$CUDA_NOTE" "$((SECONDS - T0))"
