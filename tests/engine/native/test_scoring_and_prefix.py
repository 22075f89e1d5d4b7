"""Score requests (pass-1 label scoring, few-shot fitness) and the shared-prefix KV cache, both checked
against a plain full forward of the model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.contract import GenerationRequest, SamplingParams, ScoreSpec
from engine.native.llm_engine import EngineConfig, LLMEngine


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tok


def run(engine, reqs) -> dict:
    for r in reqs:
        engine.add_request(r)
    out: dict = {}
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
    return out


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (n, V)


def test_scores_match_a_full_forward(tiny):
    model, tok = tiny
    prefix = tok("Instructions: classify the text below.\nText: ").input_ids
    texts = ["two plus two", "write a sorting function in python", "why is the sky blue at noon"]
    labels = tok(" math code other").input_ids[:3]
    eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=256))
    reqs = []
    for i, t in enumerate(texts):
        ids = prefix + tok(t).input_ids
        reqs.append(GenerationRequest(f"s{i}", ids, SamplingParams(max_tokens=1),
                                      score=ScoreSpec(labels, continuation_start=len(prefix)), prefix_len=len(prefix) - 1))
    # A generating request in the same steps must be unaffected.
    reqs.append(GenerationRequest("g", tok("Hello").input_ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    out = run(eng, reqs)
    assert eng.prefix_cache.hits + eng.prefix_cache.misses == 3
    for i, t in enumerate(texts):
        ids = prefix + tok(t).input_ids
        lp = full_logprobs(model, ids)
        res = out[f"s{i}"][-1].scores
        assert out[f"s{i}"][-1].finished and out[f"s{i}"][-1].token_ids == []
        torch.testing.assert_close(torch.tensor(res.next_logprobs), lp[-1, labels], atol=1e-4, rtol=0)
        want = lp[len(prefix) - 1 : -1].gather(1, torch.tensor(ids[len(prefix):])[:, None]).sum()
        assert res.continuation_tokens == len(ids) - len(prefix)
        assert abs(res.continuation_logprob - float(want)) < 1e-3
    assert len([t for o in out["g"] for t in o.token_ids]) == 5
    assert eng.stats()["running"] == 0


def test_prefix_cache_reuse_gives_the_same_tokens(tiny):
    model, tok = tiny
    prefix = tok("You are a helpful assistant. Answer briefly and precisely.\n").input_ids
    eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=256))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def gen(rid, text, use_prefix):
        ids = prefix + tok(text).input_ids
        o = run(eng, [GenerationRequest(rid, ids, params, prefix_len=len(prefix) if use_prefix else 0)])
        return [t for x in o[rid] for t in x.token_ids]

    plain = [gen(f"p{i}", t, False) for i, t in enumerate(["Question one", "Another question here"])]
    first = gen("c0", "Question one", True)  # miss: computes and stores the prefix
    second = gen("c1", "Another question here", True)  # hit: copies the prefix KV, prefills the rest
    assert eng.prefix_cache.hits == 1 and eng.prefix_cache.misses == 1 and len(eng.prefix_cache) == 1
    assert [first, second] == plain
