"""A training job when its server is SIGKILLed: the training child dies with the server, and the restarted
server reports the job as failed: no training of the killed server runs beside the new server's jobs."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx

from experts.train.lifeline import RECORD, start_time
from tests.support.live import free_port, serve_process, wait_process_healthy, wait_training_phase

LONG = {"steps": 100_000, "batch_size": 4, "micro_batch": 2, "lr": 0.05, "generator_steps": 2, "train_limit": 32,
        "test_limit": 4}


def _serve(model: Path, tmp: Path, port: int):
    return serve_process("--model", str(model), "--served-model-name", "tiny", "--port", str(port),
                         "--cache-dir", str(tmp / "cache"), "--expert-dir", str(tmp / "store"), "--adapt-targets",
                         "attn", "--threads", "1", "--no-shipped-experts", "--max-model-len", "1024",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_sigkilled_server_takes_its_training_child_along(tiny_llama_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(tiny_llama_dir, tmp_path, port)
    child = None
    try:
        wait_process_healthy(url, server)
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/training/sapt", json={"name": "skills", "tasks": ["reverse"], **LONG})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_training_phase(c, job_id)
        record = json.loads((tmp_path / "cache" / "training" / job_id / RECORD).read_text())
        child = record["pid"]
        assert start_time(child) == record["started"]  # the record names the running child

        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 5
        while start_time(child) is not None:
            assert time.monotonic() < deadline, "the training child outlived its SIGKILLed server"
            time.sleep(0.05)

        server = _serve(tiny_llama_dir, tmp_path, port)
        wait_process_healthy(url, server)
        job = httpx.get(f"{url}/v1/training/{job_id}").json()
        assert job["status"] == "failed" and "server stopped" in job["error"], job
        assert not (tmp_path / "cache" / "training" / job_id / RECORD).exists()
        assert "skills" not in {e["id"] for e in httpx.get(f"{url}/v1/experts").json()["data"]}
    finally:
        server.kill()
        server.wait()
        if child is not None and start_time(child) is not None:
            subprocess.run(["kill", "-9", str(child)])
