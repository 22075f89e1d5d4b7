"""scripts/install-torch.sh chooses torch's build for the machine (dry runs: the pip command it would run)."""
from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time

import pytest

from tests.support import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "install-torch.sh"


def run(tmp_path, *, gpu: bool, cpu_index: str, **env) -> tuple[str, str, float]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    # Only the fake bin folder and the system's: a real nvidia-smi elsewhere on PATH does not count.
    path = f"{bin_dir}:/usr/bin:/bin"
    t0 = time.monotonic()
    p = subprocess.run(["sh", str(SCRIPT), "pip", "torch==2.13.0"], capture_output=True, text=True, timeout=60,
                       env={"PATH": path, "T2_DRY_RUN": "1", "T2_CPU_INDEX": cpu_index, "T2_PROBE_TIMEOUT": "2",
                            "HOME": str(tmp_path), **env})
    assert p.returncode == 0, p.stderr
    return p.stdout.strip(), p.stderr, time.monotonic() - t0


@pytest.fixture
def index_server():
    """A local stand-in for torch's CPU index (any path answers 200)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/whl/cpu"
    srv.shutdown()


def test_without_a_gpu_the_cpu_index_is_used_when_it_answers(tmp_path, index_server):
    cmd, err, _ = run(tmp_path, gpu=False, cpu_index=index_server)
    assert cmd == f"pip install --progress-bar on torch==2.13.0 --index-url {index_server}"
    assert "CPU build" in err


def test_an_unreachable_cpu_index_falls_back_to_the_default_index_quickly(tmp_path):
    cmd, err, seconds = run(tmp_path, gpu=False, cpu_index="http://10.255.255.1/whl/cpu")  # no route: times out
    assert cmd == "pip install --progress-bar on torch==2.13.0"
    assert "did not answer within 2 s" in err and seconds < 15


def test_a_gpu_gets_the_default_index_and_an_explicit_index_wins(tmp_path, index_server):
    cmd, err, _ = run(tmp_path, gpu=True, cpu_index=index_server)
    assert cmd == "pip install --progress-bar on torch==2.13.0" and "NVIDIA GPU is present" in err
    cmd, _, _ = run(tmp_path, gpu=True, cpu_index=index_server, T2_TORCH_INDEX="https://example.org/whl/cu130")
    assert cmd.endswith("--index-url https://example.org/whl/cu130")


def test_the_makefile_installs_torch_through_the_script():
    assert 'sh scripts/install-torch.sh "$(PIP)" "$(TORCH)"' in (REPO_ROOT / "Makefile").read_text()
    assert os.access(SCRIPT, os.R_OK)
