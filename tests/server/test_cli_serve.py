"""``t2serve serve`` as a process: a model that cannot be loaded ends it with exit code 1 and one line
saying why (not a server answering 503 forever), a taken port ends it at once with one line naming the port
(before any model loads), and health probes stay out of the access log."""
from __future__ import annotations

import socket
import subprocess
import time

import httpx

from tests.support.live import free_port, serve_process, wait_process_healthy


def _serve(*args: str) -> subprocess.Popen:
    return serve_process(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_model_that_cannot_load_ends_the_process_with_one_line(tmp_path):
    proc = _serve("--model", str(tmp_path / "no-such-model"), "--port", str(free_port()),
                  "--cache-dir", str(tmp_path / "cache"))
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("t2serve: error: the model could not be served:") and "no-such-model" in last
    assert "Traceback" not in err


def test_a_taken_port_ends_the_command_at_once_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = _serve("--port", str(port), "--cache-dir", str(tmp_path / "cache"))
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        took = time.monotonic() - start
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [f"t2serve: error: --port (T2_PORT): cannot listen on 127.0.0.1:{port}: "
                                        "Address already in use"]
    assert took < 2, took  # measured 0.3 s: the port is bound before torch and the model load (24 s before)
    assert not (tmp_path / "cache").exists()  # nothing was converted or cached


def test_health_probes_stay_out_of_the_access_log(tiny_llama_dir, tmp_path):
    port = free_port()
    proc = _serve("--model", str(tiny_llama_dir), "--port", str(port), "--cache-dir", str(tmp_path / "cache"),
                  "--expert-dir", str(tmp_path / "store"), "--max-model-len", "256")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_healthy(url, proc)
        for _ in range(3):
            assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    log = out + err
    assert '"POST /v1/completions HTTP/1.1" 200' in log, log[-2000:]
    assert f"listening on http://127.0.0.1:{port}" in log
    assert "/health" not in log
    assert proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled (PID 1 in a container: 0)
