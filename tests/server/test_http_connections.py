"""Connections that hold the server without sending requests: a request head must arrive within
``header_timeout``, open connections are capped (the one waiting longest for its head goes first), and the
bytes of bodies still arriving are capped for all requests together. /health keeps answering throughout,
also against a server whose open-file limit is lower than the number of such connections."""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx

from tests.support import REPO_ROOT
from tests.support.live import MODEL, assert_error_shape, serve, wait_process_healthy
from tests.support.reliability.http import partial_request_status

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "  # never ends with the blank line


def _connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def _closed_after(s: socket.socket, wait: float) -> float | None:
    """Seconds until the server closed ``s`` (None: still open after ``wait``)."""
    s.settimeout(wait)
    t0 = time.monotonic()
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:  # reset
        pass
    return time.monotonic() - t0


def _health_seconds(url: str) -> float:
    t0 = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    return time.monotonic() - t0


def test_a_request_head_that_does_not_arrive_is_closed_after_the_header_timeout(tiny_settings):
    with serve(tiny_settings(header_timeout=1.0)) as srv:
        silent, partial, kept = _connect(srv.url), _connect(srv.url), _connect(srv.url)
        partial.sendall(PARTIAL_HEAD)
        # A kept-alive connection: one whole request, then the next one's head only in part.
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        kept.sendall(PARTIAL_HEAD)
        for s in (silent, partial, kept):
            took = _closed_after(s, wait=5)
            assert took is not None and took < 2.5, took
            s.close()
        assert _health_seconds(srv.url) < 1


def test_beyond_max_connections_the_longest_waiting_one_is_closed(tiny_settings):
    with serve(tiny_settings(max_connections=20, header_timeout=60)) as srv, ExitStack() as stack:
        held = [stack.enter_context(_connect(srv.url)) for _ in range(40)]
        for s in held:
            s.sendall(PARTIAL_HEAD)
        for _ in range(5):
            assert _health_seconds(srv.url) < 1
        # The first half has been closed to make room; the newest are still open.
        assert all(_closed_after(s, wait=2) is not None for s in held[:15])
        assert _closed_after(held[-1], wait=0.5) is None


def test_half_open_connections_beyond_the_open_file_limit_do_not_stop_health(tiny_llama_dir, tmp_path):
    """``t2serve serve`` under an open-file limit of 256: 600 connections that never finish their head
    (the header timeout is far away) leave /health answering at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_llama_dir),
                             "--port", str(port), "--cache-dir", str(tmp_path / "cache"),
                             "--expert-dir", str(tmp_path / "store"), "--max-model-len", "256", "--log-level", "warning"],
                            cwd=REPO_ROOT, env={**os.environ, "T2_HEADER_TIMEOUT": "120"}, stdout=subprocess.DEVNULL,
                            stderr=log, preexec_fn=low_fd_limit)
    try:
        wait_process_healthy(url, proc)
        with ExitStack() as stack:
            for _ in range(600):
                s = stack.enter_context(_connect(url))
                s.sendall(PARTIAL_HEAD)
            time.sleep(1)
            slowest = max(_health_seconds(url) for _ in range(5))
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert slowest < 2 and r.status_code == 200, slowest
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    err = (tmp_path / "server.log").read_text()
    assert "Too many open files" not in err and "Traceback" not in err, err[-3000:]


def _head(length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_bodies_still_arriving_share_a_byte_budget(tiny_settings):
    """Two bodies of 90 kB in flight pass a budget of 150 kB: the second is refused (503, Retry-After) at
    once; whole small requests go on, and once the first body leaves its bytes are free again."""
    settings = tiny_settings(max_body_bytes=100_000, max_expert_bytes=1024, max_pending_body_bytes=150_000,
                             body_read_timeout=30)
    with serve(settings) as srv, srv.client() as c:
        first = _connect(srv.url)
        first.sendall(_head(100_000) + b"x" * 90_000)
        time.sleep(0.3)
        status, seconds = partial_request_status(srv.url, _head(100_000), b"x" * 90_000, wait=10)
        assert status == 503 and seconds < 2
        hello = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=hello).status_code == 200
        first.close()
        time.sleep(0.3)
        padded = json.dumps({**hello, "user": "x" * 90_000})
        assert c.post("/v1/completions", content=padded, headers={"content-type": "application/json"}).status_code == 200
        err = assert_error_shape(c.post("/v1/completions", json={**hello, "user": "x" * 200_000}), 413)
        assert err["code"] == "request_too_large"
