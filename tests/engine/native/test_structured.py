"""Structured outputs (engine.structured, xgrammar): every constrained row parses, and constrained, free and
adapted rows share one batch, each free or adapted row giving exactly its solo tokens."""
from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.contract import GenerationRequest, SamplingParams, Structure
from engine.native.llm_engine import EngineConfig, LLMEngine
from engine.structured import StructureError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "size": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
          "required": ["name", "size", "ok"], "additionalProperties": False}


def valid(doc: dict) -> bool:
    return (set(doc) == {"name", "size", "ok"} and isinstance(doc["name"], str) and len(doc["name"]) <= 6
            and doc["size"] in (1, 2, 3) and isinstance(doc["ok"], bool))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from adapters import install

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    runtime = install(model, "mlp", None, progress=False)
    return LLMEngine(model, tok, EngineConfig(max_num_seqs=8, max_model_len=256), runtime)


def run(e: LLMEngine, reqs: list[GenerationRequest]) -> dict[str, dict]:
    for r in reqs:
        e.add_request(r)
    res: dict[str, dict] = {}
    while e.has_work:
        for o in e.step():
            r = res.setdefault(o.request_id, {"ids": [], "text": "", "reason": None, "error": None})
            r["ids"] += o.token_ids
            r["text"] += o.text
            r["reason"], r["error"] = o.finish_reason or r["reason"], o.error or r["error"]
    return res


def test_bad_structures_are_refused_and_good_ones_compiled_once(engine):
    g = engine.grammars
    for bad in (Structure("json", "{not json"), Structure("json", "[1]"), Structure("regex", "(unclosed"),
                Structure("choice", ()), Structure("grammar", "root ::= undefined_rule")):
        with pytest.raises(StructureError):
            g.check(bad)
    st = Structure("json", json.dumps(SCHEMA))
    assert g.compile(st) is g.compile(Structure("json", json.dumps(SCHEMA)))


def test_constrained_free_and_adapted_rows_share_a_batch(engine):
    from adapters import Adaptation, SVFExpert

    tok = engine.tokenizer
    ids = tok("Describe a cat:").input_ids
    g = torch.Generator().manual_seed(0)
    expert = SVFExpert("e", {t.name: torch.randn(t.rank, generator=g) for t in engine.runner.adapt.targets})
    adapted = Adaptation.expert(expert)

    def reqs():
        return [
            GenerationRequest("json", ids, SamplingParams(max_tokens=60, temperature=0.0,
                                                          structure=Structure("json", json.dumps(SCHEMA)))),
            GenerationRequest("json-sampled", ids, SamplingParams(max_tokens=60, temperature=1.0, seed=1,
                                                                  structure=Structure("json", json.dumps(SCHEMA)))),
            GenerationRequest("json-adapted", ids, SamplingParams(max_tokens=60, temperature=1.0, seed=2,
                                                                  structure=Structure("json", json.dumps(SCHEMA))),
                              adapted),
            GenerationRequest("object", ids, SamplingParams(max_tokens=120, temperature=0.0,
                                                            structure=Structure("json_object"))),
            GenerationRequest("choice", ids, SamplingParams(max_tokens=10, temperature=1.0, seed=3,
                                                            structure=Structure("choice", ("yes", "no", "maybe")))),
            GenerationRequest("regex", ids, SamplingParams(max_tokens=20, temperature=1.0, seed=4,
                                                           structure=Structure("regex", r"[0-9]{3}-[a-z]{2}"))),
            GenerationRequest("free", ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
            GenerationRequest("free-adapted", ids, SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                                  ignore_eos=True), adapted),
        ]

    together = run(engine, reqs())
    for name in ("json", "json-sampled", "json-adapted"):
        assert together[name]["reason"] == "stop" and valid(json.loads(together[name]["text"])), together[name]
    # any JSON object: unbounded, so a tiny random model may run out of tokens; what it wrote is a prefix
    obj = together["object"]
    assert obj["reason"] == "length" or isinstance(json.loads(obj["text"]), dict), obj
    assert together["choice"]["text"] in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", together["regex"]["text"])
    for r in reqs():  # every row alone: the same tokens (the masks touch only their own rows)
        assert run(engine, [r])[r.request_id]["ids"] == together[r.request_id]["ids"], r.request_id


# A character the grammar engine cannot follow (U+615AA, beyond the Basic Multilingual Plane, unassigned): the
# structure compiles, but after its prefix no token is allowed.
STUCK = "a\U000615aab"


def test_a_choice_the_grammar_engine_cannot_finish_is_refused_up_front(engine):
    with pytest.raises(StructureError, match="choice 1 cannot be generated .* after 'a'"):
        engine.grammars.check(Structure("choice", ("yes", STUCK)))
    engine.grammars.check(Structure("choice", ("caf\u00e9", "\U0001f600 smile")))  # beyond the BMP, fine


def test_a_structure_at_a_dead_end_fails_its_own_request_as_a_bad_request_and_no_other(engine):
    from engine.native.llm_engine import DEAD_END

    ids = engine.tokenizer("Describe a cat:").input_ids
    free = GenerationRequest("free", ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    stuck = GenerationRequest("stuck", ids, SamplingParams(max_tokens=8, temperature=0.0,
                                                           structure=Structure("regex", STUCK)))
    outs = []
    for r in (stuck, free):
        engine.add_request(r)
    while engine.has_work:
        outs += engine.step()
    last = {o.request_id: o for o in outs}
    assert last["stuck"].error == DEAD_END and last["stuck"].bad_request and last["stuck"].finished
    assert not last["free"].error and not last["free"].bad_request
    together = [t for o in outs if o.request_id == "free" for t in o.token_ids]
    assert run(engine, [free])["free"]["ids"] == together  # the free row's tokens, as alone
