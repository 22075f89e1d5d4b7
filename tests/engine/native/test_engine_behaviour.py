"""Engine behaviour: seeds, stop strings, max_tokens, EOS, aborts and slot reuse, sampling filters."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.contract import GenerationRequest, PromptTooLongError, SamplingParams
from engine.native.llm_engine import EngineConfig, LLMEngine
from engine.native.sampling import filter_logits, sample
from engine.native.sequence import Detokenizer


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tok


def make_engine(tiny, **kw) -> LLMEngine:
    model, tok = tiny
    return LLMEngine(model, tok, EngineConfig(**{"max_num_seqs": 4, "max_model_len": 256, **kw}))


def drain(engine) -> dict:
    res: dict = {}
    while engine.has_work:
        for o in engine.step():
            r = res.setdefault(o.request_id, {"ids": [], "text": "", "reason": None})
            r["ids"] += o.token_ids
            r["text"] += o.text
            r["reason"] = o.finish_reason
    return res


def req(tok, rid, prompt="Hello there, how are", **params):
    return GenerationRequest(rid, tok(prompt).input_ids, SamplingParams(**params))


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    _, tok = tiny
    e = make_engine(tiny)
    e.add_request(req(tok, "a", max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    alone = drain(e)["a"]["ids"]
    e.add_request(req(tok, "x", max_tokens=30, temperature=1.0, ignore_eos=True))
    e.add_request(req(tok, "y", prompt="Other prompt", max_tokens=5, temperature=0.7, seed=1, ignore_eos=True))
    e.add_request(req(tok, "a", max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    res = drain(e)
    assert res["a"]["ids"] == alone
    e.add_request(req(tok, "b", max_tokens=20, temperature=1.0, seed=8, ignore_eos=True))
    assert drain(e)["b"]["ids"] != alone


def test_max_tokens_and_length_reason(tiny):
    _, tok = tiny
    e = make_engine(tiny)
    e.add_request(req(tok, "a", max_tokens=7, temperature=0.0, ignore_eos=True))
    r = drain(e)["a"]
    assert len(r["ids"]) == 7 and r["reason"] == "length"


def test_stop_string_cuts_text_and_frees_slot(tiny):
    model, tok = tiny
    e = make_engine(tiny)
    e.add_request(req(tok, "a", max_tokens=40, temperature=0.0, ignore_eos=True))
    full = drain(e)["a"]["text"]
    assert len(full) > 10
    stop = full[5:8]
    e.add_request(req(tok, "b", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    r = drain(e)["b"]
    assert r["reason"] == "stop"
    assert r["text"] == full[: full.index(stop)]
    assert e.stats()["running"] == 0


def test_eos_and_stop_token_ids_end_the_sequence(tiny):
    _, tok = tiny
    e = make_engine(tiny)
    e.add_request(req(tok, "a", max_tokens=10, temperature=0.0, ignore_eos=True))
    ids = drain(e)["a"]["ids"]
    e.add_request(req(tok, "b", max_tokens=10, temperature=0.0, stop_token_ids=[ids[3]]))
    r = drain(e)["b"]
    assert r["reason"] == "stop" and r["ids"] == ids[: ids.index(ids[3]) + 1]
    # The same token as EOS (not ignored) also stops.
    e.eos_token_ids = [ids[2]]
    e.add_request(req(tok, "c", max_tokens=10, temperature=0.0))
    r = drain(e)["c"]
    assert r["reason"] == "stop" and r["ids"][-1] == ids[2]


def test_abort_frees_slot_and_others_continue(tiny):
    _, tok = tiny
    e = make_engine(tiny, max_num_seqs=2)
    e.add_request(req(tok, "a", max_tokens=50, temperature=0.0, ignore_eos=True))
    e.add_request(req(tok, "b", prompt="Something else entirely", max_tokens=12, temperature=0.0, ignore_eos=True))
    e.add_request(req(tok, "c", max_tokens=12, temperature=0.0, ignore_eos=True))  # waits for a slot
    early = [o for _ in range(2) for o in e.step()]
    assert e.stats()["running"] == 2 and e.stats()["waiting"] == 1
    out = e.abort("a")
    assert out.finish_reason == "abort"
    assert e.stats()["running"] == 1
    res = drain(e)
    res["b"]["ids"] = [t for o in early if o.request_id == "b" for t in o.token_ids] + res["b"]["ids"]
    assert len(res["b"]["ids"]) == 12 and len(res["c"]["ids"]) == 12
    # "b" moved from slot 1 to slot 0 when "a" left; its output must still equal a solo run.
    e.add_request(req(tok, "b2", prompt="Something else entirely", max_tokens=12, temperature=0.0, ignore_eos=True))
    solo = drain(e)["b2"]["ids"]
    assert solo == res["b"]["ids"] and len(set(solo)) > 3
    assert e.stats()["running"] == 0 and e.stats()["kv_tokens_used"] == 0


def test_prompt_too_long_rejected(tiny):
    _, tok = tiny
    e = make_engine(tiny, max_model_len=32)
    with pytest.raises(PromptTooLongError):
        e.add_request(GenerationRequest("a", list(range(30)), SamplingParams(max_tokens=8)))


def test_top_k_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    f = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(f).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, ...]
    f = filter_logits(logits, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(f).tolist() == [[True, True, False, False, False]]
    f = filter_logits(logits, torch.tensor([0]), torch.tensor([float(p[0]) - 0.01]))
    assert torch.isfinite(f).tolist() == [[True, False, False, False, False]]
    # Sampling never leaves the kept set; greedy rows take the argmax.
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]), [g])) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, torch.tensor([0.0]), torch.tensor([0]), torch.tensor([1.0]), [None])) == 0


def test_detokenizer_holds_back_partial_stop(tiny):
    _, tok = tiny
    ids = tok("alpha beta gamma delta").input_ids
    d = Detokenizer(tok, ["gamma d"])
    emitted, hit = "", False
    for i in range(1, len(ids) + 1):
        t, hit = d.push(ids[:i])
        emitted += t
        if hit:
            break
    assert hit and emitted == "alpha beta "


def test_cache_growth_then_compaction(tiny):
    """Buffers grown during a forward can still be compacted when a sequence leaves."""
    _, tok = tiny
    e = make_engine(tiny, max_model_len=512)
    c = e.cache  # start small so the prompts below force growth inside a forward
    c.k, c.v, c.capacity = c.k[..., :64, :].clone(), c.v[..., :64, :].clone(), 64
    long_prompt = "word " * 150
    e.add_request(req(tok, "a", prompt=long_prompt, max_tokens=3, temperature=0.0, ignore_eos=True))
    e.add_request(req(tok, "b", prompt=long_prompt, max_tokens=20, temperature=0.0, ignore_eos=True))
    res = drain(e)
    assert c.capacity >= 170 and len(res["b"]["ids"]) == 20
    e.add_request(req(tok, "c", prompt=long_prompt, max_tokens=20, temperature=0.0, ignore_eos=True))
    assert drain(e)["c"]["ids"] == res["b"]["ids"]


def test_a_row_with_non_finite_logits_fails_alone(tiny_llama_dir):
    """A request whose adaptation overflows (a direct-parametrized z of 1e30, which uploads refuse but the
    engine must survive) ends alone with an error; greedy, sampled and score requests in the same batch
    give exactly what they give alone."""
    from adapters import Adaptation, SVFExpert, install
    from engine.contract import ScoreSpec

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    runtime = install(model, "mlp", None, progress=False)
    e = LLMEngine(model, tok, EngineConfig(max_num_seqs=6, max_model_len=256), runtime)
    bad = Adaptation.expert(SVFExpert("bad", {t.name: torch.full((t.rank,), 1e30) for t in runtime.targets},
                                      "direct"))

    def requests():
        ids = tok("Hello there, how are").input_ids
        return {
            "greedy": GenerationRequest("greedy", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)),
            "sampled": GenerationRequest("sampled", ids, SamplingParams(max_tokens=8, temperature=1.0, seed=3,
                                                                        ignore_eos=True)),
            "score": GenerationRequest("score", ids, SamplingParams(max_tokens=1), score=ScoreSpec([5, 7])),
            "bad-greedy": GenerationRequest("bad-greedy", ids, SamplingParams(max_tokens=8, temperature=0), bad),
            "bad-sampled": GenerationRequest("bad-sampled", ids, SamplingParams(max_tokens=8, temperature=1.0,
                                                                                seed=5), bad),
            "bad-score": GenerationRequest("bad-score", ids, SamplingParams(max_tokens=1), bad,
                                           score=ScoreSpec([5, 7])),
        }

    def run(names):
        res = {}
        reqs = requests()
        for n in names:
            e.add_request(reqs[n])
        while e.has_work:
            for o in e.step():
                r = res.setdefault(o.request_id, {"ids": [], "error": None, "scores": None})
                r["ids"] += o.token_ids
                r["error"] = r["error"] or o.error
                r["scores"] = o.scores or r["scores"]
        return res

    alone = {n: run([n])[n] for n in ("greedy", "sampled", "score")}
    mixed = run(["greedy", "bad-greedy", "sampled", "bad-sampled", "score", "bad-score"])
    for n in ("greedy", "sampled"):
        assert mixed[n]["error"] is None and mixed[n]["ids"] == alone[n]["ids"] and len(alone[n]["ids"]) == 8
    assert mixed["score"]["scores"].next_logprobs == pytest.approx(alone["score"]["scores"].next_logprobs, abs=1e-5)
    for n in ("bad-greedy", "bad-sampled", "bad-score"):
        assert "non-finite logits" in (mixed[n]["error"] or ""), (n, mixed[n])
        assert mixed[n]["ids"] == []
    assert e.counters.failed == 3 and not e.scheduler.running and not e.scheduler.waiting


def test_sampling_a_row_that_has_no_distribution_fails_that_row_only():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0], [float("-inf")] * 3])
    out = sample(logits, torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3),
                 [torch.Generator().manual_seed(0)] * 3)
    assert out[0].item() in (0, 1, 2) and out[1].item() == -1 and out[2].item() == -1
