"""Fair admission: a per-request cap on sequences (`n` x prompts, 400 naming the field) and each client's
share of the slots and the queue, so one client's flood slows another client but never locks it out.
Clients are told apart by their address: these tests connect from distinct loopback addresses."""
from __future__ import annotations

import contextlib
import time

import httpx

from tests.support.live import LONG, MODEL, assert_error_shape, serve

SMALL = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}


def client_from(srv, address: str, **kw) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.x.y.z reaches the loopback server)."""
    return httpx.Client(base_url=srv.url, timeout=kw.pop("timeout", 120),
                        transport=httpx.HTTPTransport(local_address=address), **kw)


def test_sequences_over_the_request_cap_are_refused_naming_the_field(tiny_settings):
    with serve(tiny_settings(max_request_seqs=16)) as srv, client_from(srv, "127.0.0.1") as c:
        many = {**SMALL, "prompt": ["Hello"] * 36, "n": 8, "temperature": 1.0}
        err = assert_error_shape(c.post("/v1/completions", json=many), 400)
        assert err["param"] == "prompt" and "288 sequences" in err["message"] and "16" in err["message"]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 8, "max_tokens": 2}
        ok = c.post("/v1/chat/completions", json=chat)
        assert ok.status_code == 200, ok.text  # 8 <= 16
        err = assert_error_shape(c.post("/v1/completions", json={**SMALL, "prompt": ["a", "b", "c"], "n": 8}), 400)
        assert err["param"] == "prompt"


def test_a_flood_of_288_sequences_does_not_hold_back_another_client(tiny_settings):
    """36 prompts x n=8 from one client, admitted whole (the caps raised for it); another client's small
    request is served within a few times its latency alone, not queued behind the 288 sequences."""
    settings = tiny_settings(max_num_seqs=8, max_waiting=376, max_request_seqs=288)  # 0.75 x (8 + 376) = 288
    with serve(settings) as srv, client_from(srv, "127.0.0.2") as other:
        alone = []
        for _ in range(3):
            t0 = time.monotonic()
            assert other.post("/v1/completions", json=SMALL).status_code == 200
            alone.append(time.monotonic() - t0)
        normal = sorted(alone)[1]

        flood = {**SMALL, "prompt": [f"Story {i}:" for i in range(36)], "n": 8, "max_tokens": 64,
                 "temperature": 1.0, "ignore_eos": True, "stream": True}
        with client_from(srv, "127.0.0.3") as greedy, greedy.stream("POST", "/v1/completions", json=flood) as r:
            assert r.status_code == 200  # all 288 accepted
            srv.wait_until(lambda s: s["running"] >= 6)  # the flood holds its share: 6 of the 8 slots
            t0 = time.monotonic()
            ok = other.post("/v1/completions", json=SMALL, timeout=30)
            beside = time.monotonic() - t0
            assert ok.status_code == 200, ok.text
            assert srv.state.gate.stats()["waiting"] > 200  # measured while the flood was still being served
            assert beside < max(8 * normal, normal + 1.0), (beside, normal)
        srv.wait_idle()  # leaving the flood's stream aborted its 288 sequences, queued or running
        assert srv.state.gate.stats() == {"clients": 0, "waiting": 0}


def test_a_client_over_its_queue_share_gets_429_while_another_is_admitted(tiny_settings):
    # 2 slots, 2 queue places, half of each per client: 1 generating and 1 waiting per client.
    long = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG, "temperature": 0, "stream": True}
    with (serve(tiny_settings(max_num_seqs=2, max_waiting=2, client_share=0.5)) as srv,
          client_from(srv, "127.0.0.4") as greedy, client_from(srv, "127.0.0.5") as other,
          contextlib.ExitStack() as streams):
        for _ in range(2):
            assert streams.enter_context(greedy.stream("POST", "/v1/completions", json=long)).status_code == 200
        srv.wait_until(lambda s: s["running"] == 1)
        err = assert_error_shape(greedy.post("/v1/completions", json=SMALL), 429)
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        # The other client finds its slot free: it generates beside the greedy one.
        assert streams.enter_context(other.stream("POST", "/v1/completions", json=long)).status_code == 200
        srv.wait_until(lambda s: s["running"] == 2)
        assert srv.state.gate.stats() == {"clients": 2, "waiting": 1}
        streams.close()  # leaving aborts the runs, and gives the places back
        srv.wait_idle()
        deadline = time.monotonic() + 10
        while srv.state.gate.stats()["clients"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.state.gate.stats() == {"clients": 0, "waiting": 0}
        assert greedy.post("/v1/completions", json=SMALL).status_code == 200
