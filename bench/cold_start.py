"""First start of the server on a fresh cache: how long until it answers, and until it adapts.

Starts ``t2serve serve`` (the embedded model by default) as a new process with an empty cache folder, then
measures from the moment it is started:
  health_s          /health answers 200 (the model converted and loaded)
  first_answer_s    a base completion has come back
  adaptation_s      /health's adaptation phase is "ready" (the SVD of the adapted matrices done in the
                    background while base requests are served)
  warm_health_s     a second start on the now filled cache: /health 200
  warm_adaptation_s and its adaptation ready
Also the server's peak RSS (VmHWM) and the SVD progress seen in /health. Goals: first answer <= 60 s (30 s).

    python bench/cold_start.py [--model FOLDER_OR_GGUF] [--threads N] [--out results/cold_start.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def one_start(args, cache: Path, label: str) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--cache-dir", str(cache)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out: dict = {"start": label}
    progress = []
    try:
        while time.monotonic() - t0 < args.timeout:
            status, body = _get(f"{base}/health", timeout=5)
            if status == 200:
                out["health_s"] = round(time.monotonic() - t0, 1)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            time.sleep(0.2)
        print(f"{label}: /health 200 after {out.get('health_s')} s", flush=True)
        status, body = _get(f"{base}/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                                       "temperature": 0})
        out["first_answer_s"] = round(time.monotonic() - t0, 1)
        out["first_answer_status"] = status
        print(f"{label}: first base answer after {out['first_answer_s']} s", flush=True)
        while time.monotonic() - t0 < args.timeout:
            status, body = _get(f"{base}/health", timeout=5)
            a = body.get("adaptation", {})
            if a.get("percent") is not None and (not progress or progress[-1][1] != a.get("percent")):
                progress.append((round(time.monotonic() - t0, 1), a.get("percent")))
                print(f"{label}: SVD {a.get('percent')}% at {progress[-1][0]} s", flush=True)
            if a.get("phase") in ("ready", "failed"):
                out["adaptation_s"] = round(time.monotonic() - t0, 1)
                out["adaptation_phase"] = a.get("phase")
                break
            time.sleep(1)
        out["svd_progress"] = progress
        out["peak_rss_mb"] = _peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or .gguf (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2-cold-") as tmp:
        cache = Path(tmp) / "cache"
        cold = one_start(args, cache, "cold")
        warm = one_start(args, cache, "warm")
    result = {"machine": machine(), "model": args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "cold": cold, "warm": warm, "goal_first_answer_s": 60, "stretch_goal_s": 30,
              "met": (cold.get("first_answer_s") or 1e9) <= 60}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
