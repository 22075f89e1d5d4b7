"""Pass 1 per request: decide which experts answer it.

Strategies: ``none`` (base weights), ``prompt`` (the base model classifies the request over the
registered experts' categories), ``cls_expert`` (the same with the classifier expert applied), and
explicit experts/weights. The classification forward is an engine score request, so it batches with
other requests' work and reuses the shared prompt prefix. ``other`` — or a category with no expert —
means the base weights.
"""
from __future__ import annotations

import itertools
import math
import time

from adapters.adaptation import Adaptation
from engine.contract import GenerationRequest, SamplingParams, ScoreSpec
from experts.pass1.classify import ClassifierPrompt, build_classifier_prompt
from experts.pass1.decision import AdaptationError, Decision
from experts.store.registry import ExpertRegistry

CLASSIFIER = "classifier"
_ids = itertools.count()


class Dispatcher:
    def __init__(self, engine, registry: ExpertRegistry, guidelines: dict[str, str] | None = None,
                 system_template: str | None = None):
        self.engine, self.registry = engine, registry
        self.guidelines, self.system_template = guidelines, system_template
        self._prompt: tuple[tuple[str, ...], ClassifierPrompt] | None = None

    # --- what is registered -------------------------------------------------------------------------
    def experts_by_category(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for e in self.registry.entries():
            cat = e.meta.get("category")
            if cat and cat not in (CLASSIFIER, "other") and e.meta.get("kind", "svf") in ("svf", "mixture"):
                out.setdefault(cat, []).append(e)
        return out

    def classifier_prompt(self, categories: list[str]) -> ClassifierPrompt:
        key = tuple(sorted(categories))
        if self._prompt is None or self._prompt[0] != key:  # rebuilt only when the categories change
            self._prompt = (key, build_classifier_prompt(self.engine.tokenizer, list(key), self.guidelines,
                                                         self.system_template))
        return self._prompt[1]

    def classifier_expert(self):
        found = [e for e in self.registry.entries() if e.meta.get("category") == CLASSIFIER]
        return found[0] if found else None

    # --- strategies -----------------------------------------------------------------------------------
    async def classify(self, text: str, adaptation: Adaptation | None = None) -> tuple[str, dict[str, float]]:
        """(chosen category, probability per category) for `text`; 'other' when nothing is registered."""
        by_cat = self.experts_by_category()
        if not by_cat:
            return "other", {"other": 1.0}
        prompt = self.classifier_prompt(list(by_cat))
        ids = prompt.ids_for(self.engine.tokenizer, text)
        req = GenerationRequest(f"pass1-{next(_ids)}", ids, SamplingParams(max_tokens=1), adaptation,
                                score=ScoreSpec(list(prompt.label_ids)), prefix_len=len(prompt.prefix_ids))
        last = None
        async for out in self.engine.generate(req):
            last = out
        if last is None or last.scores is None:
            raise RuntimeError(f"pass 1 failed: {getattr(last, 'error', None) or 'no scores'}")
        logp = last.scores.next_logprobs
        top = max(logp)
        z = sum(math.exp(v - top) for v in logp)
        probs = {lab: math.exp(v - top) / z for lab, v in zip(prompt.labels, logp)}
        return max(probs, key=probs.get), probs

    async def decide(self, strategy: str, text: str) -> Decision:
        t0 = time.perf_counter()
        if strategy == "none":
            return Decision("none")
        if strategy not in ("prompt", "cls_expert"):
            raise AdaptationError(f"unknown strategy {strategy!r}")
        pass1 = None
        if strategy == "cls_expert":
            clf = self.classifier_expert()
            if clf is None:
                raise AdaptationError("strategy 'cls_expert' needs an expert registered with category 'classifier'",
                                      code="expert_not_found")
            pass1 = Adaptation.expert(clf.expert)
        category, probs = await self.classify(text, pass1)
        experts = self.experts_by_category().get(category)
        d = Decision(strategy, chosen=category, weights={k: round(v, 6) for k, v in probs.items()})
        if experts:  # several experts of one category: the first by name (deterministic)
            d.adaptation = Adaptation.expert(experts[0].expert)
            d.expert = experts[0].name
        d.pass1_ms = (time.perf_counter() - t0) * 1000
        return d
