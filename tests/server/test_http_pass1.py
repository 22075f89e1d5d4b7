"""Pass 1 per request over HTTP: `prompt` and `cls_expert` classify the request with one scored
prefill, route it to the chosen category's expert (or the base weights for `other` and categories
without an expert), and say so in the response."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.pass1.dispatch import Dispatcher
from experts.store.registry import ExpertRegistry
from tests.support.live import assert_error_shape, serve
from tests.support.reference import TEXT, mlp_targets, random_expert, reference_model, reference_probs


@pytest.fixture(scope="module")
def tiny_weights(tiny_llama_dir):
    return mlp_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def pass1_server(tiny_settings, tiny_weights):
    reg = ExpertRegistry()
    experts = {}
    for seed, (name, cat) in enumerate([("m", "math"), ("c", "code"), ("clf", "classifier")]):
        experts[name] = random_expert(name, tiny_weights, seed + 10)
        reg.put(experts[name], {"kind": "svf", "category": cat})
    with serve(tiny_settings(), registry=reg) as srv:
        yield srv, experts, reg


def post(srv, **body):
    with srv.client() as c:
        return c.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 8, "temperature": 0, **body})


def run_strategy(srv, strategy: str):
    """(response, its `adaptation` report) of one request with pass-1 `strategy`."""
    r = post(srv, adaptation={"strategy": strategy})
    assert r.status_code == 200, r.text
    return r, r.json()["adaptation"]


def assert_probs(info: dict, want: dict[str, float]) -> None:
    for k, v in want.items():
        assert abs(info["weights"][k] - v) < 1e-4


def test_prompt_strategy_scores_like_a_full_forward_and_routes(pass1_server, tiny_llama_dir):
    srv, experts, _ = pass1_server
    r, info = run_strategy(srv, "prompt")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    want = reference_probs(base, tok, ["code", "math"])
    assert set(info["weights"]) == {"code", "math", "other"}
    assert_probs(info, want)
    assert info["strategy"] == "prompt" and info["chosen"] == max(want, key=want.get)
    assert info["pass1_ms"] > 0
    expected_expert = {"math": "m", "code": "c", "other": None}[info["chosen"]]
    assert info["expert"] == expected_expert
    # The generated text is the chosen expert's (or the base model's) output.
    same = post(srv, model=expected_expert) if expected_expert else post(srv, adaptation={"strategy": "none"})
    assert r.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]


def test_cls_expert_applies_the_classifier_in_pass1(pass1_server, tiny_llama_dir):
    srv, experts, _ = pass1_server
    r, info = run_strategy(srv, "cls_expert")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with_clf = reference_probs(reference_model(tiny_llama_dir, [(experts["clf"], 1.0)]), tok, ["code", "math"])
    base = reference_probs(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
                           tok, ["code", "math"])
    assert_probs(info, with_clf)
    assert max(abs(with_clf[k] - base[k]) for k in base) > 1e-3  # the classifier really changed pass 1
    assert info["strategy"] == "cls_expert" and info["chosen"] == max(with_clf, key=with_clf.get)


@pytest.mark.parametrize("forced,expert", [("math", "m"), ("code", "c"), ("other", None), ("reasoning", None)])
def test_routing_of_each_category(pass1_server, monkeypatch, forced, expert):
    """Each category goes to its expert; `other` and a category without an expert use the base weights."""
    srv, _, _ = pass1_server

    async def fake_classify(self, text, adaptation=None):
        return forced, {forced: 1.0}

    monkeypatch.setattr(Dispatcher, "classify", fake_classify)
    r = post(srv, adaptation={"strategy": "prompt"})
    info = r.json()["adaptation"]
    assert info["chosen"] == forced and info["expert"] == expert
    ref = post(srv, model=expert) if expert else post(srv, adaptation={"strategy": "none"})
    assert r.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]


def test_stream_last_chunk_carries_adaptation_and_bad_strategies(pass1_server):
    srv, _, reg = pass1_server
    with srv.client() as c:
        with c.stream("POST", "/v1/completions", json={"prompt": TEXT, "max_tokens": 4, "stream": True,
                                                       "adaptation": {"strategy": "prompt"}}) as r:
            lines = [l for l in r.iter_lines() if l.startswith("data: ") and l != "data: [DONE]"]
        import json
        chunks = [json.loads(l[6:]) for l in lines]
        assert chunks[-1]["adaptation"]["strategy"] == "prompt"
        assert all("adaptation" not in ch for ch in chunks[:-1])
        assert_error_shape(c.post("/v1/completions", json={"prompt": "x", "adaptation": {"strategy": "psychic"}}), 400)
        assert_error_shape(c.post("/v1/completions", json={"prompt": "x", "adaptation": {"stratgy": "prompt"}}), 400)
    # Without a classifier expert, cls_expert is a clear 400; a deleted expert is no longer chosen at once.
    clf = reg.get("clf")
    reg.remove("clf")
    try:
        r = post(srv, adaptation={"strategy": "cls_expert"})
        assert assert_error_shape(r, 400)["param"] == "adaptation"
    finally:
        reg.put(clf.expert, clf.meta)


def test_chat_classifies_the_last_user_turn(pass1_server):
    srv, _, _ = pass1_server
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": TEXT}],
                                                 "max_tokens": 4, "adaptation": {"strategy": "prompt"}})
    assert r.status_code == 200, r.text
    plain = post(srv, adaptation={"strategy": "prompt"}).json()["adaptation"]
    assert r.json()["adaptation"]["weights"] == plain["weights"]
