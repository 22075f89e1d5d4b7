"""Limits with their own settings: API key (401, checked before any body is read), waiting-queue limit (429),
request body size per route (413) and read timeout (408)."""
from __future__ import annotations

import contextlib
import json

import openai
import pytest

from tests.support.live import LONG, MODEL, assert_error_shape, serve
from tests.support.reliability.http import partial_request_status

HELLO = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}


def test_api_key(tiny_settings):
    with serve(tiny_settings(api_key="s3cret")) as srv, srv.client() as c:
        err = assert_error_shape(c.post("/v1/completions", json=HELLO), 401)
        assert err["code"] == "invalid_api_key" and "Missing" in err["message"]
        err = assert_error_shape(c.post("/v1/completions", json=HELLO, headers={"Authorization": "Bearer nope"}), 401)
        assert "Incorrect" in err["message"]
        assert_error_shape(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert_error_shape(c.post("/v1/chat/completions", json={"messages": []}), 401)  # auth before validation
        ok = c.post("/v1/completions", json=HELLO, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # Probes and scrapers need no key.
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200

        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(**HELLO).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_full_gets_429_and_the_server_recovers(tiny_settings):
    # One slot, one waiting place: a running request, a waiting one, and the third is refused.
    with serve(tiny_settings(max_num_seqs=1, max_waiting=1)) as srv, srv.client() as c:
        long = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG, "temperature": 0, "stream": True}
        with contextlib.ExitStack() as streams:
            first = streams.enter_context(c.stream("POST", "/v1/completions", json=long))
            assert first.status_code == 200
            srv.wait_until(lambda s: s["running"] == 1)
            second = streams.enter_context(c.stream("POST", "/v1/completions", json=long))
            assert second.status_code == 200  # its generate() call has queued it
            third = c.post("/v1/completions", json=HELLO)
            err = assert_error_shape(third, 429)
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
            streamed = c.post("/v1/completions", json={**HELLO, "stream": True})
            assert_error_shape(streamed, 429)
        srv.wait_idle()  # leaving the streams aborted both requests
        assert c.post("/v1/completions", json=HELLO).status_code == 200
        metrics = c.get("/metrics").text
        assert 't2_http_requests_total{method="POST",route="/v1/completions",status="429"} 2.0' in metrics


def test_body_too_large(tiny_settings):
    with serve(tiny_settings(max_body_bytes=1000)) as srv, srv.client() as c:
        big = {**HELLO, "prompt": "x" * 2000}
        err = assert_error_shape(c.post("/v1/completions", json=big), 413)
        assert err["code"] == "request_too_large" and "1000" in err["message"]

        def chunked():  # no Content-Length: the limit is counted while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 100):
                yield data[i:i + 100]

        assert_error_shape(c.post("/v1/completions", content=chunked(),
                                  headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/completions", json=HELLO).status_code == 200


def test_body_sent_in_pieces(server):
    """The body limit middleware joins a chunked body and replays it whole to the app."""
    data = json.dumps(HELLO).encode()
    with server.client() as c:
        r = c.post("/v1/completions", content=iter([data[:5], data[5:]]), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _head(path: str, length: int, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{auth}\r\n").encode()


def test_keys_are_checked_before_the_body_is_read(tiny_settings):
    """A client without the right key announces a large body and sends almost none of it: it is answered at
    once (401 or 403), not after the server has buffered or waited for the body."""
    with serve(tiny_settings(api_key="user", admin_api_key="admin", body_read_timeout=20)) as srv:
        for path, length, key, want in [("/v1/experts", 50_000_000, None, 401), ("/v1/experts", 50_000_000, "user", 403),
                                        ("/v1/completions", 3_000_000, "nope", 401),
                                        ("/v1/adaptations", 500_000, "user", 403),
                                        ("/v1/training/sapt", 60_000, None, 401)]:
            status, seconds = partial_request_status(srv.url, _head(path, length, key), b'{"x": ', wait=5)
            assert status == want and seconds < 2, (path, key, status, seconds)


def test_a_body_that_does_not_arrive_gets_408(tiny_settings):
    with serve(tiny_settings(body_read_timeout=1.0)) as srv, srv.client() as c:
        status, seconds = partial_request_status(srv.url, _head("/v1/completions", 1000, None), b'{"prompt": "x', wait=10)
        assert status == 408 and 0.9 < seconds < 5
        assert c.post("/v1/completions", json=HELLO).status_code == 200  # the server goes on


def test_job_routes_have_small_body_limits(tiny_settings):
    with serve(tiny_settings()) as srv, srv.client() as c:
        err = assert_error_shape(c.post("/v1/training/sapt", json={"name": "x" * 100_000}), 413)
        assert "65536" in err["message"]
        assert_error_shape(c.post("/v1/adaptations", content=b"x" * (2 << 20),
                                  headers={"content-type": "application/json"}), 413)
