"""The vLLM engine on a GPU against the native engine (skipped without CUDA or vLLM): SAPT routed by pass 1,
a mixed batch, pass-1 scores. SmolLM2 in bf16 (``T2_GPU_MODEL``: its Hugging Face folder;
default: the embedded model converted), one vLLM engine shared by the tests, the native engine's model on
the same GPU as the reference (``tests.support.gpu_ref``, which says how tokens are compared). Each test also shows that its adaptation changes the output (it is not passing by
serving the base model).
"""
from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest
import torch

from tests.support.gpu_ref import (
    QUESTIONS,
    agreement,
    gaps,
    generate,
    record,
    sapt,
    sapt_bundle,
    svf_expert,
)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("vllm")),
                                reason="needs a CUDA GPU and vLLM")


@pytest.fixture(scope="module")
def engine(folder, ref):
    from engine.vllm.engine import VLLMEngine, VLLMOptions

    t0 = time.time()
    opts = VLLMOptions(model=folder, served_name="smollm2", cache_dir=ref.cache, dtype="bfloat16", adapt_targets="all",
                       max_model_len=1024, max_num_seqs=32, gpu_memory_utilization=0.35, enforce_eager=True,
                       sapt_bank=64)
    eng = VLLMEngine.from_options(opts)
    record("engine_start", seconds=round(time.time() - t0, 1))
    yield eng
    eng.close()


# --- the tests -------------------------------------------------------------------------------------------

def test_sapt_routed_by_pass1_matches_the_native_engine(engine, ref):
    from experts.pass1.resolver import sapt_attention

    bundle = sapt_bundle(ref)
    routed = [sapt(bundle, sapt_attention(engine.model, bundle, p).tolist()) for p in ref.prompts]
    rows = list(zip(ref.prompts, routed))
    got = generate(engine, rows)
    res = agreement(ref, rows, got)
    unadapted = max(max(gaps(ref, ids, t)) for (ids, _), t in zip(rows, got))
    record("sapt", attention=[a.sapt.attention.tolist() for a in routed], result=res, base_reference_gap=unadapted)
    assert res["ok"] and unadapted > 1.0


def test_a_batch_of_the_base_model_and_four_adaptations_gives_each_row_its_own_result(engine, ref):
    bundle = sapt_bundle(ref)
    kinds = [None, svf_expert(ref, 3, "lowrank"), svf_expert(ref, 4, "lowrank"),
             sapt(bundle, [0.7, 0.1, 0.1, 0.1], "s1"), sapt(bundle, [0.05, 0.05, 0.1, 0.8], "s2")]
    rows = [(p, a) for p in ref.prompts[:2] for a in kinds]
    got = generate(engine, rows)
    res = agreement(ref, rows, got)
    distinct = [len({tuple(t) for t in got[i * 5:(i + 1) * 5]}) for i in range(2)]
    record("mixed", result=res, distinct_outputs_per_prompt=distinct)
    assert res["ok"]  # every row is its own adaptation's greedy path
    # the rows' outputs differ (two mild adaptations may agree on a prompt)
    assert max(distinct) == 5 and min(distinct) >= 3


def test_pass1_label_scores_through_prompt_logprobs(engine, ref):
    from engine.contract import GenerationRequest, SamplingParams, ScoreSpec
    from engine.native.llm_engine import EngineConfig, LLMEngine
    from experts.pass1.classify import build_classifier_prompt

    prompt = build_classifier_prompt(ref.tok, ["code", "math", "reasoning"])
    a = svf_expert(ref, 5, "lowrank")
    reqs = []
    for i, q in enumerate(QUESTIONS):
        head = prompt.ids_for(ref.tok, q)
        ids = head + ref.tok.encode("math} because", add_special_tokens=False)
        spec = ScoreSpec(list(prompt.label_ids), continuation_start=len(head))
        reqs.append(GenerationRequest(f"p{i}", ids, SamplingParams(max_tokens=1), a if i % 2 else None, score=spec))
    native = LLMEngine(ref.model, ref.tok, EngineConfig(max_num_seqs=8, max_model_len=1024), ref.runtime)
    for r in reqs:
        native.add_request(r)
    want = {}
    while native.has_work:
        want.update({o.request_id: o.scores for o in native.step() if o.scores is not None})

    async def main():
        async def one(r):
            outs = [o async for o in engine.generate(r)]
            assert len(outs) == 1 and outs[0].completion_tokens == 0  # answered from the prompt alone
            return r.request_id, outs[0].scores
        return dict(await asyncio.gather(*(one(r) for r in reqs)))

    got = asyncio.run(main())
    diffs = [abs(x - y) for r in reqs for x, y in zip(got[r.request_id].next_logprobs, want[r.request_id].next_logprobs)]
    cont = [abs(got[r.request_id].continuation_logprob - want[r.request_id].continuation_logprob) for r in reqs]
    same_label = sum(max(range(len(prompt.labels)), key=got[r.request_id].next_logprobs.__getitem__)
                     == max(range(len(prompt.labels)), key=want[r.request_id].next_logprobs.__getitem__) for r in reqs)
    record("pass1", max_label_logprob_diff=max(diffs), max_continuation_diff=max(cont), same_label=same_label,
           requests=len(reqs))
    # bf16 logits near 20 are quantized to 0.125: label log-probs agree to a few such steps
    assert max(diffs) < 0.5 and max(cont) < 1.0 and same_label >= len(reqs) - 1
