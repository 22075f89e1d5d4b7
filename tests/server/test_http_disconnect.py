"""A client that goes away, streaming or not, frees its engine slots: the requests are aborted at once,
long before they would have finished (a LONG request runs ~10 s on the tiny model)."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import openai
import pytest

from tests.support.live import LONG, MODEL

LONG_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG, "temperature": 0}
LONG_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": LONG - 100,
             "temperature": 0}


def aborted(server) -> int:
    return server.engine.llm.counters.aborted


def assert_freed(server, aborted_before: int, expected: int) -> None:
    t0 = time.monotonic()
    server.wait_idle(timeout=3.0)
    assert aborted(server) - aborted_before == expected
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("route,body,n", [("/v1/completions", LONG_COMPLETION, 1),
                                          ("/v1/chat/completions", LONG_CHAT, 1),
                                          ("/v1/completions", LONG_COMPLETION, 3)])
def test_stream_disconnect_frees_slots(server, route, body, n):
    before = aborted(server)
    with server.client() as c:
        with c.stream("POST", route, json={**body, "n": n, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            server.wait_until(lambda s: s["running"] == n)
        # Leaving the block closes the unfinished response, hence the connection.
    assert_freed(server, before, n)


def test_openai_client_stream_close_frees_slot(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    before = aborted(server)
    stream = client.chat.completions.create(stream=True, **LONG_CHAT)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert_freed(server, before, 1)


def test_non_streaming_disconnect_frees_slot(server):
    before = aborted(server)
    with server.client(timeout=httpx.Timeout(30, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):  # gives up and closes the connection
            c.post("/v1/completions", json={**LONG_COMPLETION, "n": 2})
    assert_freed(server, before, 2)


def test_abrupt_socket_close_frees_slot(server):
    """A raw client that sends its request and vanishes without reading anything."""
    url = urlparse(server.url)
    body = ('{"model": "%s", "prompt": "Hello", "max_tokens": %d, "temperature": 0}' % (MODEL, LONG)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    before = aborted(server)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head + body)
        server.wait_until(lambda st: st["running"] == 1)
    assert_freed(server, before, 1)


def test_server_serves_after_disconnects(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={**LONG_COMPLETION, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
