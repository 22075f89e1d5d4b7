"""The vLLM engine's own logic on the CPU, with vLLM replaced by a stand-in that decodes a copy of the
model (``tests.support.fake_vllm``) through the real row-adapted layers: every kind of adaptation, scores and
errors against the native engine."""
from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import Adaptation, SAPTBundle, SVFExpert, install
from engine.contract import Engine, GenerationRequest, PromptTooLongError, QueueFullError, SamplingParams, ScoreSpec
from engine.native.async_engine import AsyncEngine
from engine.native.llm_engine import EngineConfig, LLMEngine
from engine.vllm.engine import VLLMEngine, VLLMOptions
from tests.support.fake_vllm import fake_connect

PROMPTS = ["The capital of France is", "def square(n):"]
TOKENS = 8


@pytest.fixture(scope="module")
def ref(tiny_llama_dir, tmp_path_factory):
    """The native engine's model (float32, every matrix adapted), with the SVD cache the engine shares."""
    cache = tmp_path_factory.mktemp("t2cache")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval().requires_grad_(False)
    runtime = install(model, "all", cache / "svd", progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return SimpleNamespace(model=model, runtime=runtime, tok=tok, cache=cache,
                           prompts=[tok(p).input_ids for p in PROMPTS])


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, ref):
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=ref.cache, dtype="float32",
                       adapt_targets="all", max_model_len=256, max_num_seqs=8, max_waiting=16, sapt_bank=64)
    eng = VLLMEngine.from_options(opts, connect=fake_connect)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adaptations(ref):
    """Two SVF experts (MLP) and two SAPT mixtures (q_proj, v_proj) of one bundle."""
    g = torch.Generator().manual_seed(0)
    mlp = [t for t in ref.runtime.targets if ".mlp." in t.name]
    svf = [Adaptation.expert(SVFExpert(f"e{i}", {t.name: 1.5 * torch.randn(t.rank, generator=g) for t in mlp}))
           for i in range(2)]
    torch.manual_seed(1)
    bundle = SAPTBundle({t.name: (t.out_features, t.in_features) for t in ref.runtime.targets
                         if t.name.endswith(("q_proj", "v_proj"))}, d_model=64, num_tasks=2, rank=4)
    with torch.no_grad():
        for task in bundle.tasks:
            for B in task.B:
                B.normal_(0, 0.5)
    bundle.requires_grad_(False)
    sapt = [Adaptation.sapt_weights(bundle, torch.tensor(a)) for a in ([0.8, 0.2], [0.1, 0.9])]
    return svf + sapt


def request(rid, ids, adaptation=None, n=TOKENS, **kw):
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                             adaptation, **kw)


def native(ref, reqs, model=None, runtime=None) -> dict:
    """Greedy tokens of each request on the native engine (its own per-row adaptations)."""
    eng = LLMEngine(model or ref.model, ref.tok, EngineConfig(max_num_seqs=16, max_model_len=256),
                    ref.runtime if runtime is None else runtime)
    for r in reqs:
        eng.add_request(copy.copy(r))
    out: dict = {}
    while eng.has_work:
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
            if o.scores is not None:
                out[o.request_id] = o.scores
    return out


def served(engine, reqs) -> dict:
    """Outputs of the requests sent to ``engine`` all at once: tokens, or the scores of score requests."""
    async def one(r):
        toks, last = [], None
        async for o in engine.generate(r):
            toks += o.token_ids
            last = o
        assert last.finished and last.error is None, last.error
        return r.request_id, (last.scores if r.score is not None else toks)

    async def main():
        return dict(await asyncio.gather(*(one(r) for r in reqs)))

    return asyncio.run(main())


def test_both_engines_satisfy_the_engine_contract(engine, ref):
    assert isinstance(engine, Engine) and engine.ready
    native_engine = AsyncEngine(LLMEngine(ref.model, ref.tok, EngineConfig(max_num_seqs=2, max_model_len=64),
                                          ref.runtime), "tiny")
    assert isinstance(native_engine, Engine)
    assert engine.model is not None and engine.runtime.targets == ref.runtime.targets


def test_mixed_batch_of_base_and_four_adaptations_matches_the_native_engine(engine, ref, adaptations):
    fake = engine.llm
    reqs = [request(f"r{i}-{j}", ids, a) for i, a in enumerate([None, *adaptations])
            for j, ids in enumerate(ref.prompts)]
    got, want = served(engine, reqs), native(ref, reqs)
    assert got == want
    by_prompt = [[got[f"r{i}-{j}"] for i in range(5)] for j in range(2)]
    assert all(len({tuple(t) for t in row}) == 5 for row in by_prompt)  # each row its own result
    salts = {r["id"]: r["salt"] for r in fake.requests[-10:]}
    assert salts["r0-0"] is None and len({salts[f"r{i}-0"] for i in range(1, 5)}) == 4  # prefixes kept apart
    recipes = {r["id"]: (r["params"].extra_args or {}) for r in fake.requests[-10:]}
    assert recipes["r0-0"] == {} and all(recipes[f"r{i}-0"] for i in range(1, 5))  # base rows carry no recipe


def test_score_requests_match_the_native_engine(engine, ref, adaptations):
    ids = ref.prompts[0] + ref.tok(" Paris, of course", add_special_tokens=False).input_ids
    spec = dict(next_token_ids=[5, 17, 301], continuation_start=len(ref.prompts[0]))
    reqs = [request(f"q{i}", ids, a, n=1, score=ScoreSpec(**spec)) for i, a in enumerate([None, *adaptations])]
    got, want = served(engine, reqs), native(ref, reqs)
    for r in reqs:
        g, w = got[r.request_id], want[r.request_id]
        assert g.next_logprobs == pytest.approx(w.next_logprobs, abs=1e-4)
        assert g.continuation_logprob == pytest.approx(w.continuation_logprob, abs=1e-4)
        assert g.continuation_tokens == w.continuation_tokens
    assert all(r["params"].max_tokens == 1 and r["params"].prompt_logprobs == 0
               for r in engine.llm.requests if "#score" in r["id"])  # prompt log-probs, nothing generated


def test_requests_that_cannot_be_queued_raise_at_once(engine, ref):
    async def main():
        with pytest.raises(PromptTooLongError):
            engine.generate(request("big", ref.prompts[0], n=300))
        with pytest.raises(PromptTooLongError):
            engine.generate(request("empty", []))
        engine.front.pending += 1000
        try:
            with pytest.raises(QueueFullError):
                engine.generate(request("full", ref.prompts[0]))
        finally:
            engine.front.pending -= 1000

    asyncio.run(main())


def test_leaving_a_stream_aborts_and_releases_its_rows(engine, ref, adaptations):

    async def main():
        stream = engine.generate(request("gone", ref.prompts[1], adaptations[3], n=200))
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if engine.stats()["running"] == 0 and engine.front.pending == 0:
                break
            await asyncio.sleep(0.01)
        return first

    first = asyncio.run(main())
    assert not first.finished
    assert engine.front.pending == 0
    assert all(e.refs == 0 for e in [*engine.rows._experts.values(), *engine.rows._bundles.values()])


def test_the_http_edge_refuses_a_sapt_bundle_wider_than_the_bank(engine, ref):
    bundle = SAPTBundle({t.name: (t.out_features, t.in_features) for t in ref.runtime.targets
                         if t.name.endswith("q_proj")}, d_model=64, num_tasks=9, rank=8)  # rank 72 > 64
    with pytest.raises(ValueError, match="vllm_sapt_bank"):
        engine.runtime.validate(Adaptation.sapt_weights(bundle, torch.full((9,), 1 / 9)))


def test_prompt_logprobs_for_echo_match_the_native_engine(engine, ref, adaptations):
    ids = ref.prompts[0]
    reqs = [request(f"e{i}", ids, a, n=1, score=ScoreSpec(prompt_logprobs=3))
            for i, a in enumerate([None, *adaptations[:1]])]
    got, want = served(engine, reqs), native(ref, reqs)
    for r in reqs:
        g, w = got[r.request_id].prompt_logprobs, want[r.request_id].prompt_logprobs
        assert g[0] is None and w[0] is None and len(g) == len(w) == len(ids)
        assert [e.token_id for e in g[1:]] == ids[1:]
        assert [e.logprob for e in g[1:]] == pytest.approx([e.logprob for e in w[1:]], abs=1e-4)
    assert any(r["params"].prompt_logprobs == 3 for r in engine.llm.requests if "#score" in r["id"])


def test_an_engine_on_the_callers_loop_serves_it_directly_and_other_loops_through_the_handoff(tiny_llama_dir, ref,
                                                                                              adaptations):
    """A server passes its loop (``loop=``): vLLM is started off that loop while it goes on running, then the
    engine runs on it with no thread of its own; its callers get the same tokens as the native engine's, as do
    callers on another loop; a stream left early is aborted; close() stops vLLM and leaves the loop running."""
    import threading

    server_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=ref.cache, dtype="float32",
                       adapt_targets="all", max_model_len=256, max_num_seqs=8, max_waiting=16, sapt_bank=64)
    before = set(threading.enumerate())
    eng = VLLMEngine.from_options(opts, connect=fake_connect, loop=server_loop)
    try:
        started = [t.name for t in threading.enumerate() if t not in before]
        assert eng.ready and eng._thread is None and "t2serve-vllm" not in started
        reqs = [request(f"l{i}-{j}", ids, a) for i, a in enumerate([None, *adaptations[:3]])
                for j, ids in enumerate(ref.prompts)]
        want = native(ref, reqs)

        async def on_server_loop():
            assert asyncio.get_running_loop() is server_loop
            got = await asyncio.gather(*(collect(eng, r) for r in reqs))
            stream = eng.generate(request("left", ref.prompts[1], adaptations[3], n=200))
            first = await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                if eng.front.pending == 0:
                    break
                await asyncio.sleep(0.01)
            return dict(got), first, eng.front.pending

        got, first, pending = asyncio.run_coroutine_threadsafe(on_server_loop(), server_loop).result(120)
        assert got == want and not first.finished and pending == 0
        assert served(eng, reqs[:2]) == {r.request_id: want[r.request_id] for r in reqs[:2]}  # another loop
        with pytest.raises(RuntimeError, match="off the event loop"):
            asyncio.run_coroutine_threadsafe(_boot_on(eng), server_loop).result(10)
    finally:
        eng.close()
    assert eng.llm.shut and not eng.ready and server_loop.is_running()
    server_loop.call_soon_threadsafe(server_loop.stop)
    thread.join(10)


async def collect(engine, r):
    toks, last = [], None
    async for o in engine.generate(r):
        toks += o.token_ids
        last = o
    assert last.finished and last.error is None, last.error
    return r.request_id, toks


async def _boot_on(engine):
    engine.boot()  # on the loop that is to own vLLM: refused, it would stop that loop for vLLM's whole start
