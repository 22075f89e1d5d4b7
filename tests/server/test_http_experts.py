"""Requests that name an expert or an explicit mixture get the adapted output: the same greedy tokens
as Hugging Face `generate` on a copy of the model whose weights were replaced by the merged
W' = U diag(σ ⊙ m') Vᵀ · (Σσ / Σ(σ ⊙ m')) computed here from a float64 SVD (the plain reference)."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.store.expert_store import ExpertStore
from experts.store.validation import ExpertDraft
from tests.support.live import assert_error_shape, serve
from tests.support.reference import mlp_targets, random_expert, reference_model

PROMPTS = ["The weather today is", "def add(a, b):", "Once upon a time"]


def greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expert_server(tiny_settings, tiny_llama_dir, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    weights = mlp_targets(base)
    experts = {n: random_expert(n, weights, seed) for seed, n in enumerate(["math", "code"])}
    store = tmp_path_factory.mktemp("experts")
    writer = ExpertStore(store)  # no model at hand: the server checks the shapes when it loads them
    for e in experts.values():
        writer.put(ExpertDraft(e.name, "svf", dict(e.z)))
    plain = random_expert("plain", weights, 7)  # the other parametrization (z scales σ directly)
    writer.put(ExpertDraft("plain", "svf", {n: 1 + 0.1 * z for n, z in plain.z.items()}, parametrization="direct"))
    with serve(tiny_settings(expert_dir=store)) as srv:
        yield srv, experts


def complete(srv, prompt: str, **extra) -> dict:
    with srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_experts_with_parent(expert_server):
    srv, _ = expert_server
    with srv.client() as c:
        data = c.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["math"]["parent"] == "tiny" and by_id["code"]["parent"] == "tiny"
    assert by_id["tiny"]["parent"] is None


def test_expert_and_mixture_match_merged_reference(expert_server, tiny_llama_dir):
    srv, experts = expert_server
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cases = [
        ({"model": "math"}, [(experts["math"], 1.0)]),
        ({"model": "tiny", "adaptation": {"experts": {"math": 0.3, "code": 0.7}}}, [(experts["math"], 0.3), (experts["code"], 0.7)]),
        ({"adaptation": {"experts": ["code"], "weights": [1.0]}}, [(experts["code"], 1.0)]),
    ]
    # All cases and the base model at once: rows with different mixtures share decode steps.
    with cf.ThreadPoolExecutor(8) as pool:
        futs = {(i, p): pool.submit(complete, srv, p, **extra) for i, (extra, _) in enumerate(cases) for p in PROMPTS}
        base_futs = {p: pool.submit(complete, srv, p) for p in PROMPTS}
        got = {k: f.result()["choices"][0]["text"] for k, f in futs.items()}
        got_base = {p: f.result()["choices"][0]["text"] for p, f in base_futs.items()}
    for p in PROMPTS:
        assert got_base[p] == greedy(base, tok, p, 12)
    for i, (_, mixture) in enumerate(cases):
        ref = reference_model(tiny_llama_dir, mixture)
        for p in PROMPTS:
            want = greedy(ref, tok, p, 12)
            assert got[(i, p)] == want, f"case {i}, prompt {p!r}"
    # The experts really change the output.
    assert any(got[(0, p)] != got_base[p] for p in PROMPTS)


def test_bad_adaptations_are_400(expert_server):
    srv, _ = expert_server
    with srv.client() as c:
        for adaptation in ({"experts": ["nope"]}, {"experts": {"math": "x"}}, {"experts": 3},
                           {"experts": ["math"], "weights": [1, 2]}, {"strategy": "telepathy"}):
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "adaptation": adaptation})
            err = assert_error_shape(r, 400)
            assert err["param"].startswith("adaptation")  # the field itself where the schema finds it
        for adaptation, param in (({"experts": {"math": "x"}}, "adaptation.experts"),
                                  ({"experts": {"math": 11}}, "adaptation.experts"),
                                  ({"experts": {"math": True}}, "adaptation.experts"),
                                  ({"strategy": "telepathy"}, "adaptation.strategy"),
                                  ({"experts": [f"e{i}" for i in range(17)]}, "adaptation.experts"),
                                  ({"stratgy": "prompt"}, "adaptation.stratgy")):
            err = assert_error_shape(c.post("/v1/completions", json={"prompt": "hi", "adaptation": adaptation}), 400)
            assert err["param"].startswith(param), (adaptation, err)
        r = c.post("/v1/completions", json={"model": "physics", "prompt": "hi", "max_tokens": 2})
        assert_error_shape(r, 404)
        # sakana and direct experts cannot be mixed (z is interpolated): a 400 that names both, not a 500
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                            "adaptation": {"experts": {"math": 0.5, "plain": 0.5}}})
        err = assert_error_shape(r, 400)
        assert err["param"] == "adaptation" and "math (sakana)" in err["message"] and "plain (direct)" in err["message"]
        assert c.post("/v1/completions", json={"model": "plain", "prompt": "hi", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/completions", json={"model": "math", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_mixtures_count_each_expert_in_the_metrics(expert_server):
    """A mixture is counted under each of its experts' names, never under a joined name per combination
    (names may repeat, in any order: such labels would grow /metrics without bound)."""
    srv, _ = expert_server
    with srv.client() as c:
        for names in (["math", "code"], ["code", "math", "math"], ["math"] * 5):
            complete(srv, "hi", adaptation={"experts": names})
        adapted = [line for line in c.get("/metrics").text.splitlines()
                   if line.startswith('t2_adapted_requests_total{') and 'strategy="explicit"' in line]
    assert sorted(line.split("{")[1].split("}")[0] for line in adapted) == [
        'expert="code",strategy="explicit"', 'expert="math",strategy="explicit"']


def test_the_openapi_schema_shows_the_typed_adaptation_and_its_report(expert_server):
    srv, _ = expert_server
    with srv.client() as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    spec = schemas["AdaptationSpec"]
    assert set(spec["properties"]) == {"strategy", "experts", "weights", "task"}
    assert spec.get("additionalProperties") is False
    assert set(schemas["AdaptationReport"]["properties"]) == {"strategy", "chosen", "expert", "weights", "pass1_ms"}
    completion = schemas["CompletionRequest"]["properties"]["adaptation"]
    assert "AdaptationSpec" in str(completion)
    assert "AdaptationReport" in str(schemas["ChatCompletionResponse"]["properties"]["adaptation"])
