"""Batched generation through the project's own engine: rollouts for training, replies for evaluation.

Every request carries its own ``Adaptation`` (or None for the base weights), so one engine batch may
mix experts. While training, the engine gets a frozen copy of the current z (``frozen_adaptation``): the
engine runs under inference mode and caches per-adaptation state by content, so it must never see the
live parameters that the optimizer changes in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from adapters import Adaptation, SVFExpert, SVFMixture
from engine.contract import GenerationRequest, SamplingParams
from engine.native.llm_engine import EngineConfig, LLMEngine


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the EOS token when the reply ended with one
    text: str  # decoded reply (stop strings and EOS removed)
    finish_reason: str | None


def make_engine(base, max_num_seqs: int, max_model_len: int, max_prefill_tokens: int | None = None) -> LLMEngine:
    """An engine over the installed model; its KV cache (slots x max_model_len) is allocated once here."""
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                       max_prefill_tokens=max_prefill_tokens or max(2048, 8 * max_model_len),
                       admit_batch=max_num_seqs)  # a batch of rollouts arrives at once: prefill it together
    return LLMEngine(base.model, base.tokenizer, cfg, base.runtime)


def expert_adaptation(z: Mapping[str, torch.Tensor], parametrization: str, name: str) -> Adaptation:
    """One expert with weight 1, the weight on z's device (z may live on the GPU while training)."""
    device = next(iter(z.values())).device
    return Adaptation(svf=SVFMixture((SVFExpert(name, z, parametrization),), torch.ones(1, device=device)), label=name)


def frozen_adaptation(z: Mapping[str, torch.Tensor], parametrization: str, name: str = "training") -> Adaptation:
    """An Adaptation over a detached copy of ``z`` (module name -> (k,))."""
    return expert_adaptation({n: v.detach().clone() for n, v in z.items()}, parametrization, name)


def generate(engine: LLMEngine, prompts: Sequence[list[int]], adaptations: Sequence, params: Sequence[SamplingParams]
             ) -> list[Generation]:
    """Run every prompt to completion; one ``Generation`` per prompt, in order.

    The runtime's caches are cleared first, so whether a step runs factored or on merged weights depends
    only on this call, not on what ran before (a resumed training run then repeats the same floats).
    """
    engine.runner.adapt.clear_caches()
    ids, texts, reasons = {}, {}, {}
    for i, (p, a, sp) in enumerate(zip(prompts, adaptations, params)):
        rid = f"r{i}"
        engine.add_request(GenerationRequest(rid, list(p), sp, a))
        ids[rid], texts[rid], reasons[rid] = [], [], None
    while engine.has_work:
        for out in engine.step():
            ids[out.request_id] += out.token_ids
            texts[out.request_id].append(out.text)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [Generation(ids[f"r{i}"], "".join(texts[f"r{i}"]), reasons[f"r{i}"]) for i in range(len(prompts))]
