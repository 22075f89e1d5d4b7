"""/tokenize, /detokenize and /version in vLLM's shapes, and their agreement with what generation uses."""
from __future__ import annotations

from tests.support.live import MODEL, assert_error_shape


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
