"""`vllm serve` against `t2serve serve --engine vllm` through HTTP, driven by vLLM's own `vllm bench serve`.

One run, one GPU, one model, servers started one after the other on the same settings (max_num_seqs, max_model_len,
GPU share, prefix caching on as `vllm serve` has it by default) and the same client command: `vllm bench serve`
(a client this project did not write) with its random dataset, greedy, EOS ignored, every request sent at once.
Workloads:
  base      stock `vllm serve`, then t2serve: every request on the base model
  mixture   t2serve: every request the same SVF mixture of the shipped experts (`adaptation.experts` in the body)
  cls       t2serve: every request its own SVF mixture, which pass 1 (the classifier expert) computes from its
            prompt (`adaptation.strategy: cls_expert`): a new mixture per request, pass 1 included
Reported per workload: vLLM's own output (throughput, TTFT, end-to-end latency percentiles), the ratios against
stock `vllm serve`'s base in the same run (goals: base >= 0.97x throughput, TTFT p50 and latency p50 <= 1.1x;
a new SVF mixture per request >= 0.8x), each server's peak RSS and the GPU's peak memory in use, the card.

    python bench/http_serve.py                      # the embedded SmolLM2 (converted once), defaults below
    python bench/http_serve.py --model FOLDER --num-prompts 512 --output-len 96 --out results/http_serve.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import MemorySampler, machine, print_table, write_json  # noqa: E402

GOALS = {"base": 0.97, "cls": 0.8}
MIXTURE = {"gsm8k": 0.4, "mbpp": 0.3, "arc-easy-text": 0.3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no answer from {url} within {timeout} s")


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (vLLM's engine core runs in a child), in MB."""
    total = 0
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    for line in out.stdout.split():
        total += int(line)
    return total / 1024


class Server:
    """One server process (its own process group, so that vLLM's children end with it)."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.peak_rss_mb = 0.0

    def sample(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def bench_serve(args, port: int, served: str, extra_body: dict | None, out_dir: Path, name: str,
                prompts: int | None = None) -> dict:
    """One `vllm bench serve` run; its saved result JSON."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", served,
           "--tokenizer", args.model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(prompts or args.num_prompts),
           "--ignore-eos", "--temperature", "0", "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(out_dir),
           "--result-filename", f"{name}.json"]
    if extra_body:
        cmd += ["--extra-body", json.dumps(extra_body)]
    print(f"  {name}: {' '.join(cmd[2:6])} ... {len(cmd)} args", flush=True)
    subprocess.run(cmd, check=True, timeout=args.timeout)
    return json.loads((out_dir / f"{name}.json").read_text())


def row(name: str, r: dict) -> dict:
    return {"workload": name, "completed": r.get("completed"), "tok_s": r.get("output_throughput"),
            "req_s": r.get("request_throughput"), "ttft_p50_ms": r.get("median_ttft_ms"),
            "ttft_p99_ms": r.get("p99_ttft_ms"), "e2el_p50_ms": r.get("median_e2el_ms"),
            "e2el_p99_ms": r.get("p99_e2el_ms"), "tpot_p50_ms": r.get("median_tpot_ms")}


def run(args) -> dict:
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    work = Path(tempfile.mkdtemp(prefix="http_serve-"))
    result = {"machine": machine(), "card": torch.cuda.get_device_name(0), "args": vars(args), "servers": {},
              "rows": [], "goals": {}}
    common = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    plans = [
        ("vllm", [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--served-model-name",
                  "smollm2", "--gpu-memory-utilization", str(args.gpu_memory), "--disable-log-requests",
                  "--host", "127.0.0.1", *common], [("base", None)]),
        ("t2serve", [sys.executable, "-m", "server.cli", "serve", "--engine", "vllm", "--model", args.model,
                     "--served-model-name", "smollm2", "--vllm-gpu-memory-utilization", str(args.gpu_memory),
                     "--max-waiting", str(args.num_prompts * 2), "--host", "127.0.0.1", *common],
         [("base", None), ("mixture", {"adaptation": {"experts": MIXTURE}}),
          ("cls", {"adaptation": {"strategy": "cls_expert"}})]),
    ]
    for server_name, cmd, workloads in plans:
        port = free_port()
        cmd = cmd + ["--port", str(port)]
        print(f"{server_name}: starting", flush=True)
        sampler = MemorySampler().__enter__()
        ready = None
        srv = Server(cmd, port, work / f"{server_name}.log", env)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}/v1/models", srv.proc, args.start_timeout)
            print(f"{server_name}: ready in {ready:.0f} s", flush=True)
            srv.sample()
            for name, body in workloads:
                if args.warmup:
                    bench_serve(args, port, "smollm2", body, work, f"warm-{server_name}-{name}", prompts=64)
                r = bench_serve(args, port, "smollm2", body, work, f"{server_name}-{name}")
                srv.sample()
                result["rows"].append({"server": server_name, **row(name, r)})
                write_json(args.out, result)
        finally:
            sampler.__exit__()
            srv.stop()
            result["servers"][server_name] = {"start_s": round(ready, 1) if ready is not None else None,
                                              "peak_rss_mb": round(srv.peak_rss_mb),
                                              "gpu_peak_mb": round(sampler.mb or 0), "log": str(srv.log)}
            write_json(args.out, result)
    stock = next(r for r in result["rows"] if r["server"] == "vllm")
    for r in result["rows"]:
        if r["server"] == "t2serve":
            g = {"throughput": r["tok_s"] / stock["tok_s"], "ttft_p50": r["ttft_p50_ms"] / stock["ttft_p50_ms"],
                 "e2el_p50": r["e2el_p50_ms"] / stock["e2el_p50_ms"], "goal": GOALS.get(r["workload"])}
            result["goals"][r["workload"]] = g
    print_table(result["rows"], ["server", "workload", "completed", "tok_s", "ttft_p50_ms", "e2el_p50_ms",
                                 "ttft_p99_ms", "tpot_p50_ms"])
    for name, g in result["goals"].items():
        print(f"t2serve {name} / vllm serve base: {g['throughput']:.3f}x throughput (goal {g['goal']}), "
              f"TTFT p50 {g['ttft_p50']:.2f}x, latency p50 {g['e2el_p50']:.2f}x")
    write_json(args.out, result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face folder (default: the embedded SmolLM2, converted once)")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one untimed run of each workload first (CUDA graphs, experts registered)")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--timeout", type=float, default=300, help="seconds one `vllm bench serve` run may take")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from engine.loader import resolve_model_folder
        from engine.spec import default_cache_dir

        args.model = str(resolve_model_folder(None, default_cache_dir())[0])
    run(args)


if __name__ == "__main__":
    main()
