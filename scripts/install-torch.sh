#!/bin/sh
# Install torch into a virtual environment, the right build for this machine:
#   an NVIDIA GPU (nvidia-smi lists one)  -> the default index (PyPI's Linux wheel is the CUDA build)
#   no NVIDIA GPU                         -> torch's CPU build from its CPU index, if that index answers
#                                            within T2_PROBE_TIMEOUT seconds; otherwise the default index
#                                            (a mirror or local wheel; said on stderr, as it may be large)
#
#   sh scripts/install-torch.sh PIP SPEC        e.g. sh scripts/install-torch.sh ".venv/bin/python -m pip" torch==2.13.0
#
# T2_TORCH_INDEX: use this index whatever the machine has ("default": the configured one).
# T2_CPU_INDEX (https://download.pytorch.org/whl/cpu), T2_PROBE_TIMEOUT (5).
# T2_DRY_RUN=1: print the pip command instead of running it.
set -eu
pip=$1
spec=$2
cpu_index=${T2_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
timeout=${T2_PROBE_TIMEOUT:-5}

reachable() {
    python3 - "$1" "$timeout" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).close()
except Exception as e:
    print(f"  ({type(e).__name__}: {e})", file=sys.stderr)
    sys.exit(1)
PY
}

index=
if [ -n "${T2_TORCH_INDEX:-}" ]; then
    [ "$T2_TORCH_INDEX" = default ] || index=$T2_TORCH_INDEX
    echo "torch: from ${index:-the default index} (T2_TORCH_INDEX)" >&2
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "torch: an NVIDIA GPU is present: the CUDA build from the default index" >&2
elif reachable "$cpu_index/torch/"; then
    index=$cpu_index
    echo "torch: no NVIDIA GPU: the CPU build from $cpu_index" >&2
else
    echo "torch: no NVIDIA GPU, and $cpu_index did not answer within ${timeout} s: the default index" \
         "(on Linux, PyPI's wheel is the CUDA build, several GB; set T2_TORCH_INDEX to choose)" >&2
fi
set -- install --progress-bar on "$spec"
[ -n "$index" ] && set -- "$@" --index-url "$index"
if [ "${T2_DRY_RUN:-0}" = 1 ]; then
    echo "$pip $*"
else
    # shellcheck disable=SC2086  # PIP may be a command with arguments (python -m pip)
    $pip "$@"
fi
