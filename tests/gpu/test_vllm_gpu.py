"""The vLLM engine on a GPU against the native engine (skipped without CUDA or vLLM).

SmolLM2 in bf16 (``T2_GPU_MODEL``: its Hugging Face folder; default: the embedded model converted),
one vLLM engine shared by the tests, the native engine's model on the same GPU as the reference.
Two engines in bf16 do not round alike (different kernels; logits of size ~20 are quantized to 0.125), so
"the same greedy tokens" is checked the way it can hold: given the same prefix, at least ``MIN_PICKS`` of
the tokens vLLM picks are the reference's own greedy choice and none is more than ``TOL`` nats below it
(a near-tie); exact sequence matches are counted and reported. That the served weights themselves are
exact is checked separately (the swapped W' against the native merge, the LoRA's truncation error). Each test also shows that its
adaptation changes the output (it is not passing by serving the base model). Figures go to
``$T2_GPU_OUT/gpu_tests.json`` when that is set.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("vllm")),
                                reason="needs a CUDA GPU and vLLM")

TOL = 1.0  # nats: how far below the reference's best token a pick may be (bf16 near-ties, not another model)
MIN_PICKS = 0.9  # share of positions where the pick is the reference's own greedy token
TOKENS = 32
QUESTIONS = ["What is 23 + 45?", "Write a Python function that returns the square of a number.",
             "Name three primary colors.", "Explain photosynthesis in one sentence.",
             "Translate 'good morning' into French.", "What is the capital of Japan?"]


def record(name: str, **figures) -> None:
    out = os.environ.get("T2_GPU_OUT")
    if not out:
        return
    path = Path(out) / "gpu_tests.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def folder(request) -> str:
    return os.environ.get("T2_GPU_MODEL") or str(request.getfixturevalue("smollm2_dir"))


@pytest.fixture(scope="module")
def ref(folder, tmp_path_factory):
    """The native engine's model on the GPU (bf16, every attention and MLP matrix adapted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters import install

    cache = tmp_path_factory.mktemp("t2cache")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to("cuda").eval().requires_grad_(False)
    runtime = install(model, "all", cache / "svd", progress=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    return SimpleNamespace(model=model, runtime=runtime, tok=tok, cache=cache, prompts=prompts)


@pytest.fixture(scope="module")
def engine(folder, ref):
    from engine.vllm.engine import VLLMEngine, VLLMOptions

    t0 = time.time()
    opts = VLLMOptions(model=folder, served_name="smollm2", cache_dir=ref.cache, dtype="bfloat16", adapt_targets="all",
                       max_model_len=1024, max_num_seqs=32, gpu_memory_utilization=0.35, enforce_eager=True,
                       svf_mode="swap", lora_error_budget=0.1, lora_max_rank=64, max_loras=8, max_adapters=16,
                       swap_quantum=0.05)
    eng = VLLMEngine.from_options(opts)
    record("engine_start", seconds=round(time.time() - t0, 1))
    yield eng
    eng.close()


# --- adaptations ------------------------------------------------------------------------------------

def svf_expert(ref, seed: int, kind: str):
    """``strong``: sakana z ~ N(0, 1) on every MLP matrix (a full-rank change). ``lowrank``: direct z = 1
    except on the 16 largest singular directions (a change of rank 16); ``noisy``: that plus small
    changes everywhere, so a LoRA has to truncate."""
    from adapters import Adaptation, SVFExpert

    g = torch.Generator().manual_seed(seed)
    z = {}
    for t in ref.runtime.targets:
        if ".mlp." not in t.name:
            continue
        if kind == "strong":
            z[t.name] = 0.5 * torch.randn(t.rank, generator=g)
        else:
            v = torch.ones(t.rank)
            v[:16] += (0.6 if kind == "noisy" else 0.3) * torch.randn(16, generator=g)
            if kind == "noisy":
                v[16:] += 0.01 * torch.randn(t.rank - 16, generator=g)
            z[t.name] = v
    return Adaptation.expert(SVFExpert(f"{kind}{seed}", z, "sakana" if kind == "strong" else "direct"))


def sapt_bundle(ref):
    from adapters import SAPTBundle

    torch.manual_seed(0)
    targets = {t.name: (t.out_features, t.in_features) for t in ref.runtime.targets
               if t.name.endswith(("q_proj", "v_proj"))}
    bundle = SAPTBundle(targets, d_model=ref.model.config.hidden_size, num_tasks=4, rank=8, alpha=32)
    with torch.no_grad():
        for task in bundle.tasks:
            for B in task.B:
                B.normal_(0, 0.05)
    return bundle.requires_grad_(False)


def sapt(bundle, weights, label="sapt"):
    from adapters import Adaptation

    return Adaptation.sapt_weights(bundle, torch.tensor(weights, dtype=torch.float32), label=label)


# --- running and comparing ------------------------------------------------------------------------------

def generate(engine, rows) -> list[list[int]]:
    """Greedy tokens of (prompt ids, adaptation) rows, all sent to ``engine`` at once."""
    from engine.contract import GenerationRequest, SamplingParams

    async def one(i, ids, a):
        toks = []
        req = GenerationRequest(f"g{time.monotonic_ns()}-{i}", list(ids),
                                SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True), a)
        async for o in engine.generate(req):
            assert o.error is None, o.error
            toks += o.token_ids
        return toks

    async def main():
        return await asyncio.gather(*(one(i, ids, a) for i, (ids, a) in enumerate(rows)))

    return asyncio.run(main())


def native_generate(ref, rows) -> list[list[int]]:
    from engine.contract import GenerationRequest, SamplingParams
    from engine.native.llm_engine import EngineConfig, LLMEngine

    eng = LLMEngine(ref.model, ref.tok, EngineConfig(max_num_seqs=32, max_model_len=1024), ref.runtime)
    for i, (ids, a) in enumerate(rows):
        eng.add_request(GenerationRequest(str(i), list(ids), SamplingParams(max_tokens=TOKENS, temperature=0.0,
                                                                          ignore_eos=True), a))
    out: dict = {}
    while eng.has_work:
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[str(i)] for i in range(len(rows))]


@torch.no_grad()
def gaps(ref, ids, tokens, adaptation=None) -> list[float]:
    """Per generated position: the reference's best log-prob minus that of the token picked there,
    given the same prefix (0 where the pick is the reference's own greedy choice)."""
    rt = ref.runtime
    with rt.activate(rt.plan([adaptation]) if adaptation is not None else None):
        seq = torch.tensor([list(ids) + list(tokens)], device="cuda")
        logp = ref.model(seq).logits[0, len(ids) - 1:-1].float().log_softmax(-1)  # (T, V)
    picked = logp.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    return (logp.max(-1).values - picked).tolist()


def agreement(ref, rows, got, adaptations=None) -> dict:
    """How the tokens ``got`` for ``rows`` stand against the reference (the rows' own adaptations, or
    ``adaptations`` instead)."""
    adaptations = adaptations or [a for _, a in rows]
    want = native_generate(ref, [(ids, a) for (ids, _), a in zip(rows, adaptations)])
    g = [gaps(ref, ids, t, a) for (ids, _), t, a in zip(rows, got, adaptations)]
    picks, positions = sum(x == 0 for row in g for x in row), sum(len(row) for row in g)
    return {"exact_sequences": sum(a == b for a, b in zip(got, want)), "rows": len(rows),
            "reference_picks": picks, "positions": positions, "max_gap": max(max(row) for row in g),
            "ok": picks >= MIN_PICKS * positions and max(max(row) for row in g) <= TOL}


@contextlib.contextmanager
def weights_of(ref, merged: dict):
    """The reference model with these target weights (the native engine's merged W') for the block."""
    layers = {layer.name: layer for layer in ref.runtime.layers}
    saved = {n: layers[n].weight.detach().clone() for n in merged}
    with torch.no_grad():
        for n, w in merged.items():
            layers[n].weight.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                layers[n].weight.copy_(w)


def rpc(engine, method, *args):
    return asyncio.run_coroutine_threadsafe(engine._rpc(method, args), engine._loop).result(120)


def weight_sums(engine, names) -> dict[str, list[float]]:
    """[Σw, Σw²] of each matrix as the workers hold it: their parts added (any tensor-parallel size)."""
    per_worker = rpc(engine, "t2_weight_sums", names)
    return {n: [sum(w[n][0] for w in per_worker), sum(w[n][1] for w in per_worker)] for n in names}


# --- the tests -------------------------------------------------------------------------------------------

def test_swap_gives_the_native_merged_weight_greedy_tokens(engine, ref):
    engine.router.svf_mode = "swap"
    a = svf_expert(ref, 1, "strong")
    merged = {n: w for n, w in ref.runtime.merged_weights(a).items()}
    # The weights the workers hold after the swap are the native engine's merged W', bit for bit.
    generate(engine, [(ref.prompts[0], a)])
    sums = weight_sums(engine, sorted(merged))
    for n, w in merged.items():  # (the host computes s on the CPU: a rare last-bit difference may flip a bf16)
        w = w.double()
        assert sums[n][0] == pytest.approx(float(w.sum()), abs=0.05), n
        assert sums[n][1] == pytest.approx(float(w.pow(2).sum()), rel=1e-5), n
    # Adapted and base requests together: the gate serves each group on its own weights.
    rows = [(p, a) for p in ref.prompts] + [(p, None) for p in ref.prompts[:3]]
    swaps = engine.gate.swaps
    got = generate(engine, rows)
    with weights_of(ref, merged):
        adapted = agreement(ref, rows[:6], got[:6], [None] * 6)
    base = agreement(ref, rows[6:], got[6:])
    with weights_of(ref, merged):
        as_base = max(max(gaps(ref, ids, t)) for (ids, _), t in zip(rows[6:], got[6:]))
    unadapted = max(max(gaps(ref, ids, t)) for (ids, _), t in zip(rows[:6], got[:6]))
    record("swap", adapted=adapted, base=base, swaps=engine.gate.swaps - swaps,
           swap_seconds=engine.gate.swap_seconds, base_reference_gap_of_adapted_tokens=unadapted,
           adapted_reference_gap_of_base_tokens=as_base)
    assert adapted["ok"] and base["ok"]
    assert unadapted > 1.0 and as_base > 1.0  # each group really ran on its own weights
    assert engine.gate.swaps - swaps >= 1


def test_lora_mode_stays_within_its_error_budget_and_reports_it(engine, ref):
    from adapters.lora_export import rel_error
    from engine.vllm.peft_folder import read_peft_adapter

    engine.router.svf_mode, engine.router.budget = "lora", 0.1
    a = svf_expert(ref, 2, "noisy")
    generate(engine, [(ref.prompts[0], None)])  # the base weights loaded, whatever ran before
    swaps = engine.gate.swaps
    got = generate(engine, [(p, a) for p in ref.prompts])
    report = engine.adapter_report(a)
    assert report["svf"] == "lora" and engine.gate.swaps == swaps  # a LoRA, no swap
    assert report["max_rel_error"] <= 0.1 and 0 < report["rank"] <= 64
    _, loras = read_peft_adapter(report["adapter_path"])
    merged = ref.runtime.merged_weights(a)
    served, measured = {}, []
    for m in report["matrices"]:
        layer = ref.model.get_submodule(m["name"])
        exact = merged[m["name"]].double() - layer.weight.double()
        f = loras[m["name"]]
        delta = (f.B.double() @ f.A.double()).to(exact.device)
        measured.append(rel_error(exact, delta))
        served[m["name"]] = (layer.weight.double() + delta).to(torch.bfloat16)
        assert m["rel_error"] <= 0.1 and m["rank"] <= report["rank"]
        assert measured[-1] == pytest.approx(m["rel_error"], abs=0.02)  # bf16 factors on top of the truncation
    rows = [(p, None) for p in ref.prompts]
    with weights_of(ref, served):  # what the LoRA serves: W + B A
        vs_served = agreement(ref, rows, got)
    with weights_of(ref, merged):  # the exact adaptation
        vs_exact = agreement(ref, rows, got)
    unadapted = max(max(gaps(ref, ids, t)) for (ids, _), t in zip(rows, got))
    record("lora", rank=report["rank"], max_rel_error=report["max_rel_error"], max_measured_error=max(measured),
           vs_served=vs_served, vs_exact=vs_exact, base_reference_gap=unadapted)
    assert vs_served["ok"] and unadapted > 1.0


def test_sapt_through_lora_matches_the_native_engine(engine, ref):
    from experts.pass1.resolver import sapt_attention

    bundle = sapt_bundle(ref)
    routed = [sapt(bundle, sapt_attention(engine.runtime.model, bundle, p).tolist()) for p in ref.prompts]
    rows = list(zip(ref.prompts, routed))
    got = generate(engine, rows)
    res = agreement(ref, rows, got)
    unadapted = max(max(gaps(ref, ids, t)) for (ids, _), t in zip(rows, got))
    record("sapt", attention=[a.sapt.attention.tolist() for a in routed], result=res, base_reference_gap=unadapted)
    assert res["ok"] and unadapted > 1.0


def test_a_batch_of_the_base_model_and_four_adaptations_gives_each_row_its_own_result(engine, ref):
    engine.router.svf_mode, engine.router.budget = "lora", 1e-3  # rank-16 changes, served whole
    bundle = sapt_bundle(ref)
    kinds = [None, svf_expert(ref, 3, "lowrank"), svf_expert(ref, 4, "lowrank"),
             sapt(bundle, [0.7, 0.1, 0.1, 0.1], "s1"), sapt(bundle, [0.05, 0.05, 0.1, 0.8], "s2")]
    rows = [(p, a) for p in ref.prompts[:2] for a in kinds]
    generate(engine, [(ref.prompts[0], None)])  # the base weights loaded, whatever ran before
    swaps, builds = engine.gate.swaps, engine.cache.builds
    got = generate(engine, rows)
    res = agreement(ref, rows, got)
    distinct = [len({tuple(t) for t in got[i * 5:(i + 1) * 5]}) for i in range(2)]
    record("mixed", result=res, distinct_outputs_per_prompt=distinct, adapters_built=engine.cache.builds - builds)
    assert res["ok"]  # every row is its own adaptation's greedy path
    # four adapters in one batch, no swap; the rows' outputs differ (two mild adaptations may agree on a prompt)
    assert max(distinct) == 5 and min(distinct) >= 3 and engine.gate.swaps == swaps


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
