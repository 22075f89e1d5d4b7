"""Throughput of N server replicas sharing one expert store behind a load balancer, against one replica
alone (the baseline, measured in the same run).

Each replica is ``t2serve serve`` in a process of its own on a device of its own (``--devices cuda:0,cuda:1``:
one GPU each; ``--devices cpu,cpu --cpus-per-replica 6``: CPU replicas, each pinned to its own cores with
as many torch threads, the load generator and balancer on the cores left); all share one ``--expert-dir``. The balancer is HAProxy with the compose file's
``docker/haproxy.cfg`` when ``haproxy`` is on PATH, otherwise the loopback round-robin balancer of
``bench/balancer.py`` (the JSON says which). ``--experts`` random SVF experts are uploaded to the first
replica before the others start; requests cycle through the base model and those experts (mixed
adaptations in every batch). The load is closed-loop: ``--concurrency`` clients per replica, each sending
its next completion (``--max-tokens``, temperature 0, distinct prompts) when the previous one answers;
``--requests`` per replica. Throughput = generated tokens / wall time. One replica is measured alone before
and after the N together; the speedup is against the faster of those two runs.

    python bench/replicas.py --model FOLDER --devices cuda:0,cuda:1 --out OUT/replicas.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.balancer import free_port, haproxy, round_robin  # noqa: E402
from bench.common import machine, peak_rss_mb, print_table, write_json  # noqa: E402
from bench.store import http, memory_mb, mlp_ranks, smollm2_folder, wait_ready  # noqa: E402
from engine.spec import default_cache_dir


@contextmanager
def replica(args, index: int, device: str, store: Path, log: Path, memory: dict) -> Iterator[str]:
    """Replica ``index``, a server on ``device``, healthy when the block starts (its log in ``log``); its
    peak RSS and GPU memory go into ``memory[index]`` when it stops."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(args.model), "--cache-dir", str(args.cache_dir),
           "--expert-dir", str(store), "--port", str(port), "--device", device, "--log-level", "warning",
           "--max-num-seqs", str(args.max_num_seqs), *args.serve_arg]
    if device == "cpu" and args.cpus_per_replica:
        n = args.cpus_per_replica
        cmd = ["taskset", "-c", f"{index * n}-{index * n + n - 1}", *cmd, "--threads", str(n)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
        except (RuntimeError, TimeoutError):
            print(log.read_text()[-4000:], file=sys.stderr)
            raise
        yield url
    finally:
        memory[index] = {"device": device, "peak_rss_mb": memory_mb(proc.pid).get("peak"), "gpu_mb": gpu_mb(proc.pid)}
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def gpu_mb(pid: int) -> float | None:
    """GPU memory a process holds now, MiB (nvidia-smi; None without it)."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
               if int(p) == pid) or None


def load(url: str, models: list[str], clients: int, total: int, max_tokens: int) -> dict:
    """Closed-loop load on ``url``; generated tokens per second and latencies."""
    counter, lock, tokens, latencies = iter(range(total)), threading.Lock(), [], []

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"model": models[i % len(models)], "prompt": f"Request {i}: tell me about the number {i}.",
                    "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            r = http(url + "/v1/completions", "POST", json.dumps(body).encode(), "application/json")
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(r["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": total, "clients": clients, "wall_s": wall, "tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / wall, "p50_latency_s": latencies[len(latencies) // 2],
            "p95_latency_s": latencies[int(0.95 * (len(latencies) - 1))]}


def upload_experts(url: str, model: Path, n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        z = {name: torch.randn(k, generator=g).tolist() for name, k in mlp_ranks(model).items()}
        names.append(http(url + "/v1/experts", "POST", json.dumps({"name": f"e{i}", "z": z}).encode(),
                          "application/json")["id"])
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Hugging Face folder (default: the embedded SmolLM2)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="one per replica, comma-separated")
    ap.add_argument("--concurrency", type=int, default=32, help="clients per replica")
    ap.add_argument("--requests", type=int, default=256, help="requests per replica")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--experts", type=int, default=3, help="SVF experts the requests cycle through (with the base)")
    ap.add_argument("--cpus-per-replica", type=int, default=0,
                    help="CPU replicas: cores (and torch threads) each; replica i gets cores i*N .. i*N+N-1")
    ap.add_argument("--serve-arg", action="append", default=[], help="more `t2serve serve` arguments")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.model = args.model or smollm2_folder()
    devices = args.devices.split(",")
    n = len(devices)
    rows, result = [], {"machine": machine(), "devices": devices, "args": {k: str(v) for k, v in vars(args).items()}}
    memory: dict[int, dict] = {}
    if args.cpus_per_replica and os.cpu_count() > n * args.cpus_per_replica:
        os.sched_setaffinity(0, range(n * args.cpus_per_replica, os.cpu_count()))  # clients and balancer
    with tempfile.TemporaryDirectory() as work, ExitStack() as stack:
        work = Path(work)
        store = work / "store"
        urls = [stack.enter_context(replica(args, 0, devices[0], store, work / "replica0.log", memory))]
        models = [http(urls[0] + "/v1/models")["data"][0]["id"], *upload_experts(urls[0], args.model, args.experts)]
        load(urls[0], models, args.concurrency, args.concurrency, args.max_tokens)  # warm-up
        one = load(urls[0], models, args.concurrency, args.requests, args.max_tokens)
        rows.append({"setup": "1 replica", **one})
        urls += [stack.enter_context(replica(args, i, d, store, work / f"replica{i}.log", memory))
                 for i, d in enumerate(devices[1:], 1)]
        backends = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in urls]
        kind = "haproxy" if shutil.which("haproxy") else "loopback round robin"
        url = stack.enter_context(haproxy(backends, work) if shutil.which("haproxy") else round_robin(backends))
        load(url, models, n * args.concurrency, n * args.concurrency, args.max_tokens)  # warm-up
        many = load(url, models, n * args.concurrency, n * args.requests, args.max_tokens)
        rows.append({"setup": f"{n} replicas ({kind})", **many})
        # The baseline again, now that every replica is warm: the speedup is against the faster of the two.
        again = load(urls[0], models, args.concurrency, args.requests, args.max_tokens)
        rows.append({"setup": "1 replica, again", **again})
        best = max(one["tokens_per_s"], again["tokens_per_s"])
        result.update(balancer=kind, one=one, one_again=again, many=many, speedup=many["tokens_per_s"] / best)
    result["memory"] = {"replicas": memory, "bench_peak_rss_mb": peak_rss_mb()}
    print_table(rows, ["setup", "requests", "clients", "tokens", "wall_s", "tokens_per_s", "p50_latency_s",
                       "p95_latency_s"])
    print(f"speedup: {result['speedup']:.2f}x with {n} replicas (against the faster one-replica run)")
    for i, m in sorted(memory.items()):
        print(f"replica {i} ({m['device']}): peak RSS {m['peak_rss_mb']} MiB, GPU {m['gpu_mb']} MiB")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
