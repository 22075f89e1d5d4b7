"""What experts are validated against: the served model's name, a fingerprint of its weights, the
matrices the server adapts (with their shapes) and its hidden size.

The fingerprint identifies the base *weights*, not how they are held: a strided sample of every tensor
of the state dict, rounded to bfloat16, plus names and shapes. The same checkpoint served in float32
on a CPU or in bfloat16 on a GPU gives the same fingerprint (an expert moves between them); another
checkpoint or a fine-tune of it does not (SVF z vectors only make sense for the SVD they were trained on).
It reads a few thousand values per tensor, so it costs milliseconds even for an 8B model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from adapters.targets import Target, find_targets
from engine.contract import Engine

_SAMPLE = 1024  # values per tensor


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(b"t2serve-base/1")
    for name, t in model.state_dict().items():
        if t.is_meta:  # a skeleton (engine.loader.load_skeleton): the weights are read from the checkpoint
            t = model.t2_tensor(name)
        flat = t.detach().reshape(-1)
        n = min(_SAMPLE, flat.numel())
        # Evenly strided positions in integer arithmetic (float linspace rounds past the end of big tensors).
        idx = torch.arange(n, device=flat.device) * max(flat.numel() - 1, 0) // max(n - 1, 1)
        sample = flat[idx]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).to(torch.float32)
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # the served model name (experts' `parent`)
    fingerprint: str | None  # model_fingerprint of the weights; None: unknown (no fingerprint check)
    targets: tuple[Target, ...]  # matrices the server adapts, in module order
    d_model: int | None = None  # hidden size (SAPT keys and query projection)

    def target(self, name: str) -> Target | None:
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, Target]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {t.name: t for t in self.targets}
            object.__setattr__(self, "_index", cached)  # frozen dataclass: memoise once
        return cached

    def order(self, names) -> list[str]:
        """``names`` sorted in the model's module order (unknown names last, as given)."""
        pos = {t.name: i for i, t in enumerate(self.targets)}
        return sorted(names, key=lambda n: pos.get(n, len(pos)))

    @classmethod
    def from_model(cls, model: nn.Module, name: str, targets: Sequence[Target] | None = None,
                   target_spec: str | Sequence[str] = "mlp") -> "BaseModelInfo":
        if targets is None:
            targets = find_targets(model, target_spec) if target_spec != "none" else []
        return cls(name, model_fingerprint(model), tuple(targets), _hidden_size(model))

    @classmethod
    def from_engine(cls, engine: Engine) -> "BaseModelInfo":
        """From a running engine: its model (for the fingerprint) and its adaptation runtime's targets."""
        targets = tuple(engine.runtime.targets) if engine.runtime is not None else ()
        model = engine.model
        if model is None:
            return cls(engine.model_name, None, targets)
        return cls.from_model(model, engine.model_name, targets)


def _hidden_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size is None and hasattr(model, "get_input_embeddings"):
        size = model.get_input_embeddings().weight.shape[1]
    return size
