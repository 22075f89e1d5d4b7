"""HTTP helpers of the reliability suite: the server's own count of 5xx answers, a raw socket client for
requests httpx refuses to send, and the check that a server still serves and has gone idle."""
from __future__ import annotations

import re
import socket
from urllib.parse import urlparse

import httpx

_5XX = re.compile(r'^t2_http_requests_total\{[^}]*status="5\d\d"\} ([0-9.e+]+)$', re.M)


def server_5xx(client: httpx.Client) -> int:
    """5xx answers the server has counted since it started (its Prometheus metrics)."""
    return int(sum(float(v) for v in _5XX.findall(client.get("/metrics").text)))


def raw_exchange(url: str, data: bytes, timeout: float = 10.0) -> int | None:
    """Send raw bytes; the status code of the answer, or None if the server closed without one."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed while we were still sending
            pass
        return _status_line(s)


def _status_line(s: socket.socket) -> int | None:
    """The status of the answer's first line, or None if none came (closed, or the socket timed out)."""
    got = b""
    try:
        while b"\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        return None
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", got)
    return int(m.group(1)) if m else None


def partial_request_status(url: str, head: bytes, body_part: bytes, wait: float) -> tuple[int | None, float]:
    """Send a request's head and only part of its body, then wait for an answer without sending more:
    (status, seconds until it came), or (None, wait) if none came."""
    import time

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=wait) as s:
        t0 = time.monotonic()
        s.sendall(head + body_part)
        status = _status_line(s)
    return status, (time.monotonic() - t0 if status is not None else wait)


def assert_serving_and_idle(srv, client: httpx.Client) -> None:
    """The server answers a completion, then has no running or waiting sequence left, and is healthy."""
    r = client.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    srv.wait_idle(timeout=15)
    assert client.get("/health").status_code == 200
