"""Every pass-1 strategy on both engines, through HTTP: no adaptation, explicit experts, `model` naming an
expert, `prompt`, `cls_expert` and a few-shot `task`, on the native engine and on the vLLM engine's rows (vLLM
replaced by its CPU stand-in, ``tests.support.fake_vllm``; tests/gpu runs the real one). Each answer is the
greedy text of the plain reference model with the mixture the response reports merged into its weights, and
both engines give the same answers and reports. (`sapt` through both engines: tests/experts/sapt/test_sapt_serving.py.)
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.vllm.engine import VLLMEngine, VLLMOptions
from experts.store.registry import ExpertRegistry
from tests.support.fake_vllm import fake_connect
from tests.support.live import serve
from tests.support.reference import TEXT, mlp_targets, random_expert, reference_model

TOKENS = 8
CASES = {  # name: (extra request fields, the strategy the response reports)
    "none": ({"adaptation": {"strategy": "none"}}, "none"),
    "experts": ({"adaptation": {"experts": {"m": 0.6, "c": 0.4}}}, "explicit"),
    "model": ({"model": "m"}, "expert"),
    "prompt": ({"adaptation": {"strategy": "prompt"}}, "prompt"),
    "cls_expert": ({"adaptation": {"strategy": "cls_expert"}}, "cls_expert"),
    "task": ({"adaptation": {"task": "sums"}}, "few_shot"),
}


@pytest.fixture(scope="module")
def experts(tiny_llama_dir):
    weights = mlp_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    return {name: random_expert(name, weights, seed + 10)
            for seed, name in enumerate(["m", "c", "clf", "sums"])}


def registry(experts) -> ExpertRegistry:
    reg = ExpertRegistry()
    for name, meta in (("m", {"category": "math"}), ("c", {"category": "code"}), ("clf", {"category": "classifier"}),
                       ("sums", {"kind": "mixture", "task": "sums"})):
        reg.put(experts[name], {"kind": "svf", **meta})
    return reg


def answers(server) -> dict[str, tuple[str, dict]]:
    out = {}
    with server as srv, srv.client() as c:
        for name, (extra, _) in CASES.items():
            r = c.post("/v1/completions", json={"prompt": TEXT, "max_tokens": TOKENS, "temperature": 0, **extra})
            assert r.status_code == 200, (name, r.text)
            out[name] = (r.json()["choices"][0]["text"], r.json()["adaptation"])
    return out


@pytest.fixture(scope="module")
def both(tiny_settings, tiny_llama_dir, experts):
    settings = tiny_settings(max_model_len=1024)
    native = answers(serve(settings, registry=registry(experts)))
    opts = VLLMOptions(model=str(tiny_llama_dir), served_name="tiny", cache_dir=settings.cache_dir, dtype="float32",
                       max_model_len=1024, max_num_seqs=4)
    vllm = answers(serve(settings, engine=VLLMEngine.from_options(opts, connect=fake_connect),
                         registry=registry(experts)))
    return native, vllm


def greedy(model, tok, n: int) -> str:
    ids = tok(TEXT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("case", list(CASES))
def test_each_strategy_serves_its_reported_mixture_on_both_engines(both, case, experts, tiny_llama_dir):
    native, vllm = both
    text, report = native[case]
    assert report["strategy"] == CASES[case][1]
    assert vllm[case][1]["strategy"] == report["strategy"] and vllm[case][1]["expert"] == report["expert"]
    for k, v in report["weights"].items():  # pass 1's probabilities (or the mixture's α) agree across engines
        assert vllm[case][1]["weights"][k] == pytest.approx(v, abs=1e-4)
    assert vllm[case][0] == text  # the same greedy answer
    # ... and it is the reference model's under the mixture the report names
    if report["expert"] is None:
        mixture = []
    elif case == "experts":
        mixture = [(experts[n], a) for n, a in report["weights"].items()]
    else:
        mixture = [(experts[report["expert"]], 1.0)]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = reference_model(tiny_llama_dir, mixture) if mixture else \
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert text == greedy(model, tok, TOKENS)
