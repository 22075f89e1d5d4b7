"""bench/sampling_features' attributed cost: the seconds a run spends in the logprobs and structured-output code
are counted for the runs that use them, not for plain runs, and the engine is left as it was."""
from __future__ import annotations

import torch
from transformers import AutoTokenizer

from bench.sampling_features import SCHEMA, FeatureClock, serve
from engine.native.llm_engine import LLMEngine
from engine.structured import Grammars


def test_feature_seconds_are_counted_for_the_runs_that_use_the_features(tiny_model, tiny_llama_dir):
    model, tok = tiny_model, AutoTokenizer.from_pretrained(tiny_llama_dir)
    reqs = [(tok.encode(f"Request {i}: say something."), 6) for i in range(4)]
    seconds, tokens, _, plain_s = serve(model, tok, reqs, 4, {}, torch.device("cpu"))
    assert tokens == 24 and plain_s < 0.05 * seconds  # a plain run only enters the features' entry checks
    for extra in ({"logprobs": 5}, {"structure": SCHEMA}):
        seconds, tokens, _, feature_s = serve(model, tok, reqs, 4, extra, torch.device("cpu"))
        assert tokens > 0 and 0 < feature_s < seconds
        assert feature_s > plain_s


def test_the_clock_puts_the_engine_back():
    before = (LLMEngine.__dict__["_logprobs"], Grammars.__dict__["mask"])
    with FeatureClock():
        assert LLMEngine.__dict__["_logprobs"] is not before[0]
    assert (LLMEngine.__dict__["_logprobs"], Grammars.__dict__["mask"]) == before
