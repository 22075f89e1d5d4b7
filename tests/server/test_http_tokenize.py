"""/tokenize, /detokenize and /version in vLLM's shapes, and their agreement with what generation uses; text
is tokenized off the event loop, and text too long to fit is refused before it is tokenized."""
from __future__ import annotations

import threading
import time

from server.prompts import longest_token_chars
from tests.support.live import MODEL, assert_error_shape, serve


def test_tokenize_counts_what_generation_reads_and_detokenize_inverts_it(server):
    with server.client() as c:
        r = c.post("/tokenize", json={"model": MODEL, "prompt": "Hello there", "return_token_strs": True}).json()
        assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] > 0
        gen = c.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 1}).json()
        assert gen["usage"]["prompt_tokens"] == r["count"]
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("Hello there")
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        gen = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 1}).json()
        assert gen["usage"]["prompt_tokens"] == chat["count"]
        assert c.get("/version").json()["version"]


def test_bad_tokenize_and_detokenize_bodies_are_400(server):
    with server.client() as c:
        assert assert_error_shape(c.post("/tokenize", json={}), 400)["param"] == "prompt"
        assert assert_error_shape(c.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"
        assert assert_error_shape(c.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)["code"] == \
            "model_not_found"


def test_conversations_the_template_refuses_are_400_not_500(server):
    with server.client() as c:
        for body in ({"messages": []}, {"messages": [], "add_generation_prompt": False},
                     {"messages": [{"role": "assistant", "content": "x"}], "add_generation_prompt": False}):
            r = c.post("/tokenize", json=body)
            assert r.status_code in (200, 400), (body, r.text)
            if r.status_code == 400:
                assert_error_shape(r, 400)


def test_a_huge_tokenize_leaves_health_answering(tiny_settings):
    """3.9 MB of text takes seconds to tokenize: /health answers at least once a second meanwhile (the gaps
    between answers are measured: the server shares this process)."""
    settings = tiny_settings(max_input_chars=5_000_000, max_body_bytes=8 << 20)
    with serve(settings) as srv, srv.client() as c:
        results, done = [], threading.Event()

        def huge():
            with srv.client(timeout=120) as c2:
                results.append(c2.post("/tokenize", json={"prompt": "hello world, " * 300_000}))
                results.append(c2.post("/detokenize", json={"tokens": results[0].json()["tokens"]}))
            done.set()

        worker = threading.Thread(target=huge)
        answered = [time.monotonic()]
        worker.start()
        while not done.is_set():
            assert c.get("/health").status_code == 200
            answered.append(time.monotonic())
            time.sleep(0.05)
        worker.join()
    assert results[0].status_code == 200 and results[0].json()["count"] > 600_000
    assert results[1].status_code == 200 and len(results[1].json()["prompt"]) >= 3_900_000
    gaps = [b - a for a, b in zip(answered, answered[1:])]
    assert answered[-1] - answered[0] > 1.0 and max(gaps) < 1.0, (answered[-1] - answered[0], max(gaps))


def test_text_too_long_to_fit_is_refused_before_tokenizing(server):
    """No text longer than max_model_len times the longest token can fit: such prompts, conversations and
    /tokenize inputs are a 400 naming the field."""
    limit = server.engine.max_model_len * longest_token_chars(server.engine.tokenizer)
    long = "a" * (limit + 1)
    with server.client() as c:
        for route, body, param in [("/tokenize", {"prompt": long}, "prompt"),
                                   ("/tokenize", {"messages": [{"role": "user", "content": long}]}, "messages"),
                                   ("/v1/completions", {"prompt": ["ok", long], "max_tokens": 1}, "prompt.1"),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": long[:limit // 2]},
                                                                          {"role": "user", "content": long[:limit // 2]}],
                                                             "max_tokens": 1}, "messages")]:
            err = assert_error_shape(c.post(route, json=body), 400)
            assert err["param"] == param and err["code"] == "context_length_exceeded" and str(limit) in err["message"]
        assert c.post("/tokenize", json={"prompt": "a" * 1000}).status_code == 200
