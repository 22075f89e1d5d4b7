"""Expert store benchmark: upload-to-servable latency of an SVF expert of SmolLM2, and memory.

A real server (``t2serve serve`` in a subprocess, SVD factors already cached) on loopback; this process
is the client. "Servable" means in the registry: the POST answers only after that, so its round trip
is the upload-to-servable latency (goal <= 50 ms). Each case runs ``--n`` times; medians and p95:
  GET /v1/experts        HTTP round trip that stores nothing (the baseline of this run)
  upload json (new)      JSON body with z as lists (30 x 3 x 576 numbers), a new name each time
  upload json (replace)  the same, one name: every upload is a new version
  upload safetensors     multipart with a safetensors file, a new name each time
  upload + 1st token     POST, then a 1-token completion with the new expert (the request that proves it)
  1 token (known expert) the same completion with an expert uploaded long before (baseline for the above)
  store.put in-process   the store alone (validation, serialisation, fsync, commit), no HTTP
Peak RSS: the server's VmHWM after start and after all uploads (/proc), and this process's.

    python bench/store.py --out results/store_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import machine, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.spec import default_cache_dir


def smollm2_folder() -> Path:
    from engine.loader import embedded_gguf_path, gguf_to_hf_folder

    return gguf_to_hf_folder(embedded_gguf_path(), default_cache_dir())


def mlp_ranks(folder: Path) -> dict[str, int]:
    cfg = json.loads((folder / "config.json").read_text())
    k = min(cfg["hidden_size"], cfg["intermediate_size"])
    return {f"model.layers.{i}.mlp.{p}": k for i in range(cfg["num_hidden_layers"])
            for p in ("gate_proj", "up_proj", "down_proj")}


def http(url: str, method: str = "GET", body: bytes | None = None, ctype: str | None = None) -> dict:
    req = urllib.request.Request(url, body, {"Content-Type": ctype} if ctype else {}, method=method)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def multipart(meta: dict, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{json.dumps(meta)}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="z.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[{"VmRSS": "rss", "VmHWM": "peak"}[key]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def timed(fn, n: int) -> dict:
    fn(-1)  # warm-up (first-call costs are not what this measures)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "max_ms": times[-1], "n": n}


def start_server(folder: Path, cache: Path, store: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--cache-dir", str(cache),
           "--expert-dir", str(store), "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and server.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except urllib.error.HTTPError as e:  # 503: loading, or failed for good
            if b"model_load_failed" in e.read():
                raise RuntimeError("the server failed to load the model (see its log above)") from e
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server never became healthy")


def in_process_put(folder: Path, cache: Path, z: dict, n: int) -> dict:
    """The store alone, against SmolLM2's adapted matrices (model loaded here for the fingerprint)."""
    from transformers import AutoModelForCausalLM

    from experts.store.base_model import BaseModelInfo
    from experts.store.expert_store import ExpertStore
    from experts.store.validation import ExpertDraft

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    t0 = time.perf_counter()
    base = BaseModelInfo.from_model(model, "SmolLM2", target_spec="mlp")
    fingerprint_ms = (time.perf_counter() - t0) * 1000
    del model
    with tempfile.TemporaryDirectory() as d:
        store = ExpertStore(d, base=base)
        store.load()
        res = timed(lambda i: store.put(ExpertDraft("e", "svf", dict(z))), n)
    return {**res, "fingerprint_ms": fingerprint_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Hugging Face folder (default: the embedded SmolLM2)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    folder = args.model or smollm2_folder()
    ranks = mlp_ranks(folder)
    g = torch.Generator().manual_seed(0)
    z = {n: torch.randn(k, generator=g) for n, k in ranks.items()}
    z_json = json.dumps({"z": {n: v.tolist() for n, v in z.items()}})[1:-1]  # serialised once, reused
    from safetensors.torch import save

    z_file = save(z)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as store_dir:
        server = start_server(folder, args.cache_dir, Path(store_dir), port)
        try:
            start_s = wait_ready(url, server)
            model = http(url + "/v1/models")["data"][0]["id"]
            mem = {"after_start": memory_mb(server.pid)}

            def post_json(name: str) -> dict:
                body = f'{{"name": "{name}", {z_json}}}'.encode()
                return http(url + "/v1/experts", "POST", body, "application/json")

            def one_token(name: str) -> dict:
                body = json.dumps({"model": name, "prompt": "2+2=", "max_tokens": 1, "temperature": 0}).encode()
                return http(url + "/v1/completions", "POST", body, "application/json")

            post_json("known")
            cases = {
                "GET /v1/experts": lambda i: http(url + "/v1/experts"),
                "upload json (new)": lambda i: post_json(f"new{i}"),
                "upload json (replace)": lambda i: post_json("same"),
                "upload safetensors": lambda i: http(url + "/v1/experts", "POST",
                                                     *multipart({"name": f"st{i}"}, z_file)),
                "upload + 1st token": lambda i: (post_json(f"tok{i}"), one_token(f"tok{i}")),
                "1 token (known expert)": lambda i: one_token("known"),
            }
            for label, fn in cases.items():
                if label == "upload + 1st token":  # uploads only so far: the store's own memory
                    mem["after_uploads"] = memory_mb(server.pid)
                results[label] = timed(fn, args.n)
                rows.append({"case": label, **results[label]})
            mem["after_requests"] = memory_mb(server.pid)
            experts = len(http(url + "/v1/experts")["data"])
        finally:
            server.terminate()
            server.wait(60)
    results["store.put in-process"] = in_process_put(folder, args.cache_dir, z, args.n)
    rows.append({"case": "store.put in-process", **results["store.put in-process"]})
    print(f"\nmodel {model}: {len(z)} z vectors, {sum(ranks.values())} numbers; server ready in {start_s:.1f} s "
          f"(SVD cached); {experts} experts stored")
    print_table(rows, ["case", "median_ms", "p95_ms", "max_ms", "n"])
    servable = results["upload json (new)"]["median_ms"]
    print(f"\nupload-to-servable (json, new name): median {servable:.1f} ms (goal <= 50 ms: "
          f"{'met' if servable <= 50 else 'NOT met'}); fingerprint at start "
          f"{results['store.put in-process']['fingerprint_ms']:.0f} ms")
    print("server memory (MiB): " + "; ".join(f"{k.replace('_', ' ')}: rss {v.get('rss', 0):.0f}, peak "
                                              f"{v.get('peak', 0):.0f}" for k, v in mem.items()))
    print(f"(the requests' growth is the runtime's merged-weight cache, not the store); this process peak "
          f"{peak_rss_mb():.0f} MiB")
    write_json(args.out, {"machine": machine(), "model": model, "z_vectors": len(z), "server_ready_s": start_s,
                          "server_memory_mb": mem,
                          "experts_stored": experts, "client_peak_rss_mb": peak_rss_mb(), "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
