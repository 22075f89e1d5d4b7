"""Turns a request's `model` and `adaptation` fields into the Adaptation its sequences carry.

- `model` naming a registered expert applies that expert (no pass 1).
- `adaptation: {"experts": {"math": 0.6, "code": 0.4}}` or `{"experts": ["math", "code"], "weights": [.6, .4]}`
  applies that explicit mixture (α per expert, not normalised: z' = Σ α_k z_k).
- `adaptation: {"strategy": "none"}` (or no adaptation) keeps the base weights.
Bad specs are answered with 400 naming `adaptation`.
"""
from __future__ import annotations

from typing import Any

from adapters.adaptation import Adaptation
from experts.registry import ExpertRegistry
from server.errors import invalid_request

STRATEGIES_HERE = {"none", "explicit"}


def _bad(msg: str):
    return invalid_request(msg, param="adaptation")


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


class AdaptationResolver:
    def __init__(self, registry: ExpertRegistry, runtime=None):
        self.registry = registry
        self.runtime = runtime  # AdaptationRuntime of the engine's model (validates targets)

    def is_expert(self, model: str | None) -> bool:
        return model is not None and model in self.registry

    def _check(self, adaptation: Adaptation) -> Adaptation:
        if self.runtime is not None:
            try:
                self.runtime.validate(adaptation)
            except ValueError as e:
                raise _bad(f"this adaptation does not fit the served model: {e}") from e
        return adaptation

    async def __call__(self, spec: dict | None, prompt_ids: list[int], model: str | None = None) -> Any:
        if spec is not None and not isinstance(spec, dict):
            raise _bad("'adaptation' must be an object")
        spec = spec or {}
        strategy = spec.get("strategy")
        if self.is_expert(model):
            if spec.get("experts") is not None:
                raise _bad("`model` already names an expert; do not also give 'adaptation.experts'")
            entry = self.registry.get(model)
            return self._check(Adaptation.expert(entry.expert))
        if spec.get("experts") is not None:
            if strategy not in (None, "explicit"):
                raise _bad(f"strategy {strategy!r} does not take explicit experts")
            pairs = parse_mixture(spec)
            missing = [n for n, _ in pairs if n not in self.registry]
            if missing:
                raise invalid_request(f"unknown expert(s): {', '.join(sorted(set(missing)))}", param="adaptation",
                                      code="expert_not_found")
            experts = [(self.registry.get(n).expert, w) for n, w in pairs]
            return self._check(Adaptation.mixture(experts))
        if strategy in (None, "none"):
            return None
        raise _bad(f"unknown or unavailable strategy {strategy!r}; available here: none, explicit experts")
