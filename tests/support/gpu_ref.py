"""The vLLM engine's GPU tests' common parts: the native engine's reference on the GPU and how tokens
are compared with it.

Two engines in bf16 do not round alike (different kernels; logits of size ~20 are quantized to 0.125), so
"the same greedy tokens" is checked the way it can hold: given the same prefix, at least ``MIN_PICKS`` of
the tokens vLLM picks are the reference's own greedy choice and none is more than ``TOL`` nats below it
(a near-tie); exact sequence matches are counted and reported. Figures go to ``$T2_GPU_OUT/gpu_tests.json``
when that is set.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

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



def make_ref(folder: str, cache: Path):
    """The native engine's model on the GPU (bf16, every attention and MLP matrix adapted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters import install

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to("cuda").eval().requires_grad_(False)
    runtime = install(model, "all", cache / "svd", progress=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    return SimpleNamespace(model=model, runtime=runtime, tok=tok, cache=cache, prompts=prompts)


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



