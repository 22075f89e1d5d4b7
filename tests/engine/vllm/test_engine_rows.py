"""Rows mode of the vLLM engine on the CPU (vLLM replaced by the stand-in of tests.support.fake_vllm, which plays
its runner's request slots): every request its own adaptation, slots admitted and recycled, a full table makes
requests wait, experts and SAPT bundles registered once and never dropped in use; every output is the native
engine's for that request."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from adapters import Adaptation, SAPTBundle, SVFExpert
from engine.vllm.engine import VLLMEngine, VLLMOptions
from engine.vllm.row_router import bundle_key
from tests.engine.vllm.test_engine_fake import native, ref, request, served  # noqa: F401  (ref: a fixture)
from tests.support.fake_vllm import fake_connect

SLOTS = 2


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, ref):  # noqa: F811
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=ref.cache, dtype="float32",
                       adapt_targets="all", max_model_len=256, max_num_seqs=SLOTS, max_waiting=64, sapt_bank=16,
                       max_experts=3)
    eng = VLLMEngine.from_options(opts, connect=fake_connect)
    yield eng
    eng.close()


def experts(ref, n, seed=0):  # noqa: F811
    g = torch.Generator().manual_seed(seed)
    mlp = [t for t in ref.runtime.targets if ".mlp." in t.name]
    return [SVFExpert(f"e{seed}-{i}", {t.name: 1.5 * torch.randn(t.rank, generator=g) for t in mlp}) for i in range(n)]


def bundle(ref, seed):  # noqa: F811
    torch.manual_seed(seed)
    b = SAPTBundle({t.name: (t.out_features, t.in_features) for t in ref.runtime.targets
                    if t.name.endswith(("q_proj", "v_proj"))}, d_model=64, num_tasks=2, rank=8)
    with torch.no_grad():
        for task in b.tasks:
            for B in task.B:
                B.normal_(0, 0.5)
    return b.requires_grad_(False)


def test_every_request_gets_its_own_mixture_through_recycled_slots(engine, ref):  # noqa: F811
    es = experts(ref, 2)
    b = bundle(ref, 1)
    kinds = [Adaptation.mixture({es[0]: 0.9, es[1]: 0.3}), Adaptation.mixture({es[0]: 0.2, es[1]: 1.1}), None,
             Adaptation.sapt_weights(b, torch.tensor([0.8, 0.2])), Adaptation.mixture({es[1]: 0.5}),
             Adaptation(svf=Adaptation.mixture({es[0]: 0.7}).svf, sapt=Adaptation.sapt_weights(
                 b, torch.tensor([0.3, 0.7])).sapt), None]
    reqs = [request(f"r{i}", ref.prompts[i % 2], a) for i, a in enumerate(kinds)]
    fake = engine.llm
    waited, used = fake.waited, len(fake.slots_used)
    got = served(engine, reqs)
    want = native(ref, reqs)
    for r in reqs:
        assert got[r.request_id] == want[r.request_id], r.request_id
    # outputs differ where the adaptations do (the test would pass on base weights otherwise)
    assert len({tuple(got[r.request_id]) for r in reqs if r.prompt_ids == reqs[0].prompt_ids}) >= 3
    new = fake.slots_used[used:]
    assert len(new) == len(reqs) and {s for _, s in new} == set(range(SLOTS))  # 7 requests through 2 slots
    assert fake.waited > waited and fake.peak_slots == SLOTS  # a full table made requests wait


def test_prefixes_are_kept_apart_by_adaptation(engine, ref):  # noqa: F811
    es = experts(ref, 1, seed=5)
    a, b, a2 = (Adaptation.mixture({es[0]: w}) for w in (1.0, 0.5, 1.0))
    served(engine, [request("s0", ref.prompts[0], a), request("s1", ref.prompts[0], b), request("s2", ref.prompts[0]),
                    request("s3", ref.prompts[0], a2)])
    salts = {r["id"]: r["salt"] for r in engine.llm.requests[-4:]}
    assert salts["s0"] and salts["s0"] != salts["s1"] and salts["s2"] is None
    assert salts["s3"] == salts["s0"]  # equal content, equal salt: the prefix is shared


def test_experts_are_registered_once_and_dropped_only_when_idle(engine, ref):  # noqa: F811
    es = experts(ref, 5, seed=7)
    rows = engine.rows
    puts = rows.puts
    served(engine, [request(f"x{i}", ref.prompts[0], Adaptation.mixture({es[i % 3]: 0.5 + i / 10}))
                    for i in range(6)])
    assert rows.puts == puts + 3  # one registration per expert, whatever the number of requests
    served(engine, [request(f"y{i}", ref.prompts[1], Adaptation.mixture({es[3]: 1.0, es[4]: 0.5})) for i in range(2)])
    # a request's lease is released on the engine's thread just after its last output reaches the client
    deadline = time.monotonic() + 10
    while any(e.refs for e in rows._experts.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rows._experts) <= 3 and all(e.refs == 0 for e in rows._experts.values())
    tables = engine.llm.rows.tables
    assert set(rows._experts) == set(tables.experts)  # the workers hold exactly what the front end tracks


def test_a_full_sapt_bank_makes_a_new_bundle_wait_for_a_release(engine, ref):  # noqa: F811
    # bank of 16 columns; each bundle is 2 tasks x r=8 = 16: two bundles never fit together
    b1, b2 = bundle(ref, 11), bundle(ref, 12)
    reqs = [request("b1", ref.prompts[0], Adaptation.sapt_weights(b1, torch.tensor([0.6, 0.4])), n=12),
            request("b2", ref.prompts[1], Adaptation.sapt_weights(b2, torch.tensor([0.2, 0.8])))]
    waits = engine.rows.bank_waits
    got = served(engine, reqs)
    want = native(ref, reqs)
    assert got == want  # (the worker refuses a placement over a bundle in use: b2 could only go in after b1)
    assert engine.rows.bank_waits > waits  # the second bundle waited for the first one's release
    assert list(engine.llm.rows.tables.bundles) == [bundle_key(b2)]  # b1 was dropped for it, once idle


def test_unknown_matrices_and_oversized_bundles_are_refused_with_a_clear_error(engine, ref):  # noqa: F811
    bad = Adaptation.expert(SVFExpert("bad", {"model.layers.0.mlp.nope": torch.zeros(4)}))
    with pytest.raises(ValueError, match="not adapted"):
        engine.runtime.validate(bad)
    big = SAPTBundle({t.name: (t.out_features, t.in_features) for t in ref.runtime.targets
                      if t.name.endswith("q_proj")}, d_model=64, num_tasks=3, rank=8)
    with pytest.raises(ValueError, match="SAPT bank"):
        engine.runtime.validate(Adaptation.sapt_weights(big, torch.tensor([0.2, 0.3, 0.5])))

    async def one():
        outs = [o async for o in engine.generate(request("bad", ref.prompts[0], bad))]
        return outs[-1]

    last = asyncio.run(one())
    assert last.finished and last.error and "not adapted" in last.error
    assert served(engine, [request("after", ref.prompts[0])])["after"]  # the engine goes on
