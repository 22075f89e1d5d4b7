"""Live servers for the HTTP tests: the real app and engine on the tiny random Llama, served by uvicorn
on a free loopback port from a background thread, so tests speak real HTTP (disconnects included).

A module of its own (not the conftest) so that test files can import its names."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.config import Settings
from server.edge import uvicorn_config

MODEL = "tiny"
# Long enough for "long" requests: greedy decoding of "Hello" on the tiny model never meets EOS, and
# 4000 tokens take ~10 s there, far longer than any wait in these tests.
MAX_MODEL_LEN = 4096
LONG = 4000


def assert_error_shape(r: httpx.Response, status: int) -> dict:
    """The response has ``status`` and the OpenAI error shape; returns the error object."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any

    @property
    def state(self):
        return self.app.state.t2

    @property
    def engine(self):
        return self.state.engine

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """Poll the engine stats until ``predicate(stats)``; returns them (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"engine stats never satisfied the condition: {stats}")
            time.sleep(0.02)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        return self.wait_until(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout)


def wait_for_health(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} never became healthy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(*args: str, **popen) -> subprocess.Popen:
    """``t2serve serve *args`` as a process of its own (from the repository root)."""
    from tests.support import REPO_ROOT

    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO_ROOT, **popen)


def wait_process_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait for ``proc``'s /health to answer 200 (fails the test if it exits or never does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the server never became healthy"
        time.sleep(0.2)


def wait_training_phase(c: httpx.Client, job_id: str, phase: str = "training", timeout: float = 120.0) -> dict:
    """Poll a training job until its progress reaches ``phase``; returns the job."""
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/v1/training/{job_id}").json())["progress"].get("phase") != phase:
        assert time.monotonic() < deadline, f"the training never reached {phase!r}: {job}"
        time.sleep(0.2)
    return job


@contextmanager
def serve(settings: Settings, *, engine: Any = None, wait_ready: bool = True, **app_kwargs) -> Iterator[LiveServer]:
    """Run ``create_app(settings, engine, **app_kwargs)`` under uvicorn until the block ends (without an
    engine, the app loads the model itself)."""
    app = create_app(settings, engine, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        if wait_ready:
            wait_for_health(url)
        yield LiveServer(url, app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
