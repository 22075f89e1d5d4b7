"""Turns a request's `model` and `adaptation` fields into a pass-1 Decision: the Adaptation its sequences
carry and what the response reports under `adaptation`.

- `model` naming a registered expert applies that expert (pass 1 skipped).
- `adaptation: {"experts": {"math": 0.6, "code": 0.4}}` or `{"experts": [...], "weights": [...]}` applies
  that explicit mixture (α per expert, not normalised: z' = Σ α_k z_k).
- `adaptation: {"strategy": "prompt" | "cls_expert"}` runs pass 1 (experts/pass1/dispatch.py).
- `adaptation: {"task": name}` (strategy `few_shot`) applies the task's stored few-shot (CEM) mixture.
- `adaptation: {"strategy": "none"}` keeps the base weights. No `adaptation`: the server's default strategy.
- `adaptation: {"strategy": "sapt"}` runs the SAPT bundle's attention over its tasks for the prompt.
Every answer is a ``Decision``; a bad spec raises ``AdaptationError`` (400 naming `adaptation`, or 404 for
an unknown `model`), which the HTTP edge turns into the OpenAI error shape.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from adapters.adaptation import Adaptation
from engine.contract import AdaptationCheck, Engine
from experts.pass1.decision import AdaptationError, Decision, model_not_found
from experts.pass1.dispatch import Dispatcher
from experts.store.expert_store import ExpertStore
from experts.store.registry import ExpertRegistry

STRATEGIES = ("none", "prompt", "cls_expert", "sapt")


def _bad(msg: str, code: str = "invalid_value") -> AdaptationError:
    return AdaptationError(msg, code=code)


def parse_mixture(spec: dict[str, Any]) -> list[tuple[str, float]]:
    experts, weights = spec.get("experts"), spec.get("weights")
    if isinstance(experts, dict):
        if weights is not None:
            raise _bad("give weights either inside 'experts' ({name: weight}) or as 'weights', not both")
        pairs = list(experts.items())
    elif isinstance(experts, list):
        if weights is None:
            weights = [1.0 / len(experts)] * len(experts) if experts else []
        if not isinstance(weights, list) or len(weights) != len(experts):
            raise _bad("'weights' must be a list with one number per expert")
        pairs = list(zip(experts, weights))
    else:
        raise _bad("'experts' must be a list of expert names or an object {name: weight}")
    if not pairs:
        raise _bad("'experts' is empty")
    if len(pairs) > 16:
        raise _bad(f"at most 16 experts per mixture, got {len(pairs)}")
    out = []
    for name, w in pairs:
        if not isinstance(name, str):
            raise _bad("expert names must be strings")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (-10.0 <= float(w) <= 10.0):
            raise _bad(f"weight of {name!r} must be a number in [-10, 10]")
        out.append((name, float(w)))
    return out


def mixture_of(experts: list[tuple[Any, float]], names: list[str]) -> Adaptation:
    """The explicit mixture, or a 400 when its experts cannot be mixed (z is interpolated: they must share
    the parametrization, sakana or direct, and adapt the same matrices)."""
    kinds = {n: e.parametrization for n, (e, _) in zip(names, experts)}
    if len(set(kinds.values())) > 1:
        raise _bad("experts of one mixture must share a parametrization; got "
                   + ", ".join(f"{n} ({k})" for n, k in kinds.items()))
    try:
        return Adaptation.mixture(experts)
    except ValueError as e:
        raise _bad(f"these experts cannot be mixed: {e}") from None


class Resolver:
    """Pass 1 of a server: ``decide`` turns one prompt's request fields into a ``Decision``."""

    def __init__(self, registry: ExpertRegistry, engine: Engine | None = None, default_strategy: str = "none",
                 store: ExpertStore | None = None, adaptation_wait_s: float = 30.0):
        self.registry = registry
        self.engine = engine
        self.adaptation_wait_s = adaptation_wait_s  # how long a request waits for the adaptive layers at start
        # The engine validates adaptations against the served model's targets (one protocol, both engines).
        self.runtime: AdaptationCheck | None = engine.runtime if engine is not None else None
        self.default_strategy = default_strategy
        self.model_name = engine.model_name if engine is not None else None  # the served base model's name
        self.dispatcher = Dispatcher(engine, registry) if engine is not None else None
        self.store = store  # SAPT bundles live in the store, not in the registry

    async def _wait_ready(self) -> None:
        """At start the adaptive layers are prepared in the background: wait for them up to
        ``adaptation_wait_s``, then answer 503 with a Retry-After from the progress so far."""
        engine = self.engine
        if engine is None or engine.adaptation.get("phase") == "ready":
            return
        if await engine.wait_adaptation(self.adaptation_wait_s):
            return
        state = engine.adaptation
        if state.get("phase") == "failed":
            raise AdaptationError(f"adapted requests cannot be served: {state.get('error')}", status=503,
                                  code="adaptation_unavailable")
        percent = state.get("percent") or 0.0
        raise AdaptationError(f"the adaptive layers are still being prepared ({percent:.0f}% of the SVD done): "
                              "base requests are served now; retry this one later", status=503,
                              code="adaptation_not_ready", retry_after=state.get("eta_s") or 10)

    def _check(self, adaptation: Adaptation) -> Adaptation:
        if self.runtime is not None:
            try:
                self.runtime.validate(adaptation)
            except ValueError as e:
                raise _bad(f"this adaptation does not fit the served model: {e}") from e
        return adaptation

    def _entry(self, name: str, entry=None):
        entry = entry or self.registry.get(name)
        if entry is None:
            raise _bad(f"unknown expert: {name}", code="expert_not_found")
        if entry.meta.get("kind", "svf") not in ("svf", "mixture"):
            raise _bad(f"expert {name!r} is a {entry.meta.get('kind')} expert; only SVF experts are applied this way")
        return entry

    async def decide(self, spec: dict | None, prompt_ids: list[int], model: str | None = None,
                     text: str | None = None) -> Decision:
        """The decision for one prompt (``text``: what pass 1 classifies; None: the decoded prompt)."""
        if spec is not None and not isinstance(spec, dict):
            raise _bad("'adaptation' must be an object")
        spec = spec or {}
        unknown = set(spec) - {"strategy", "experts", "weights", "task"}
        if unknown:
            raise _bad(f"unknown field(s) in 'adaptation': {', '.join(sorted(unknown))}")
        strategy = spec.get("strategy")
        if strategy is not None and not isinstance(strategy, str):
            raise _bad(f"'strategy' must be a string, got {type(strategy).__name__}")
        # One registry read: an expert deleted since the route checked `model` must not turn into the base
        # weights answered under the expert's name.
        named = self.registry.get(model) if model is not None else None
        if named is None and model not in (None, self.model_name) and self.model_name is not None:
            raise model_not_found(model)
        base_only = (named is None and spec.get("task") is None and spec.get("experts") is None
                     and (strategy or self.default_strategy) == "none")
        if not base_only:
            await self._wait_ready()
        if named is not None:
            if spec.get("experts") is not None:
                raise _bad("`model` already names an expert; do not also give 'adaptation.experts'")
            entry = self._entry(model, named)
            return Decision("expert", self._check(Adaptation.expert(entry.expert)), chosen=[model], expert=model,
                            weights={model: 1.0})
        if spec.get("task") is not None:
            task = spec["task"]
            if not isinstance(task, str) or (strategy not in (None, "few_shot")) or spec.get("experts") is not None:
                raise _bad("'task' takes a task name (a few-shot result) and no other strategy or experts")
            if task not in self.registry:
                raise _bad(f"no adaptation for task {task!r}: create it with POST /v1/adaptations",
                           code="expert_not_found")
            return Decision("few_shot", self._check(Adaptation.expert(self._entry(task).expert)), chosen=task,
                            expert=task, weights={task: 1.0})
        if spec.get("experts") is not None and strategy != "sapt":
            if strategy not in (None, "explicit"):
                raise _bad(f"strategy {strategy!r} does not take explicit experts")
            pairs = parse_mixture(spec)
            experts = [(self._entry(n).expert, w) for n, w in pairs]
            names = [n for n, _ in pairs]
            return Decision("explicit", self._check(mixture_of(experts, names)), chosen=names,
                            expert="+".join(names), weights=dict(pairs))
        strategy = strategy or self.default_strategy
        if strategy not in STRATEGIES:
            raise _bad(f"unknown or unavailable strategy {strategy!r}; available: {', '.join(STRATEGIES)}, "
                       "or explicit 'experts'")
        if strategy == "none" or self.dispatcher is None:
            return Decision("none")
        if strategy == "sapt":
            return await self._sapt(spec, prompt_ids)
        if text is None:
            text = self.dispatcher.engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        decision = await self.dispatcher.decide(strategy, text)
        if decision.adaptation is not None:
            self._check(decision.adaptation)
        return decision

    async def _sapt(self, spec: dict, prompt_ids: list[int]) -> Decision:
        """The bundle's attention over its tasks for this prompt (masked max-pool of the frozen input
        embeddings, query projection, softmax(k·q/√d)); the request is served by that mixture of blocks."""
        t0 = time.perf_counter()
        bundles = [] if self.store is None else [s.name for s in self.store.bundles()]
        named = spec.get("experts")
        if named is not None:
            if not (isinstance(named, list) and len(named) == 1 and isinstance(named[0], str)):
                raise _bad("strategy 'sapt' takes at most one bundle name in 'experts'")
            name = named[0]
        elif len(bundles) == 1:
            name = bundles[0]
        else:
            raise _bad("strategy 'sapt' needs a SAPT bundle: " + (
                "none is registered" if not bundles else f"name one of {', '.join(sorted(bundles))} in 'experts'"),
                code="expert_not_found")
        bundle = self.store.bundle(name) if self.store is not None else None
        if bundle is None:
            raise _bad(f"no ready SAPT bundle named {name!r}", code="expert_not_found")
        # the engine's model: a whole one (native) or a skeleton with its input embeddings (vLLM), both enough here
        attn = await asyncio.to_thread(sapt_attention, self.engine.model, bundle, prompt_ids)
        adaptation = self._check(Adaptation.sapt_weights(bundle, attn, label=name))
        weights = {f"task{i}": round(float(a), 6) for i, a in enumerate(attn)}
        return Decision("sapt", adaptation, chosen=name, expert=name, weights=weights,
                        pass1_ms=(time.perf_counter() - t0) * 1000)


def sapt_attention(model, bundle, prompt_ids: list[int]):
    """(T,) attention of one prompt (runs off the event loop: a small MLP over the prompt embeddings)."""
    with torch.inference_mode():
        emb = model.get_input_embeddings()
        dev = emb.weight.device
        ids = torch.tensor([prompt_ids], device=dev)
        p = next(bundle.parameters())
        x = emb(ids).to(device=p.device, dtype=p.dtype)
        return bundle.attention(x, torch.ones(ids.shape, dtype=torch.bool, device=p.device))[0].float().cpu()
