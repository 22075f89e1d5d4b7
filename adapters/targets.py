"""Which linear layers of a model get adapted.

SVF adapts whole weight matrices and SAPT adds LoRA blocks to them; both need the same list of target
modules, named by their Hugging Face module names (``model.layers.0.mlp.gate_proj``) in module order,
which is also state-dict order (layer 0 gate, up, down; layer 1 ...), the order the reference code uses
for its expert files.

Supported families: Llama / Mistral / Qwen2 style (``nn.Linear`` q/k/v/o_proj, gate/up/down_proj) and
GPT-2 (``Conv1D`` c_attn, c_proj, c_fc, whose weight is stored transposed as (in, out)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

TargetKind = Literal["linear", "conv1d"]

# Module-name suffixes (matched at a dot boundary) per target set. GPT-2's MLP and attention both
# have a `c_proj`, so the parent module name is part of the suffix.
ATTN_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "attn.c_attn", "attn.c_proj",
)
MLP_SUFFIXES = (
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp.c_fc", "mlp.c_proj",
)
TARGET_SETS = {"mlp": MLP_SUFFIXES, "attn": ATTN_SUFFIXES, "all": ATTN_SUFFIXES + MLP_SUFFIXES}


@dataclass(frozen=True)
class Target:
    """One adapted matrix W (out × in)."""

    name: str  # HF module name, e.g. "model.layers.0.mlp.gate_proj"
    kind: TargetKind  # "conv1d": the module stores W transposed, as (in, out)
    out_features: int
    in_features: int

    @property
    def rank(self) -> int:
        """k of the thin SVD."""
        return min(self.out_features, self.in_features)


def _is_conv1d(module: nn.Module) -> bool:
    # Imported lazily and matched by name too, so remote-code copies of Conv1D are recognised.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def target_kind(module: nn.Module) -> TargetKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    return None


def weight_matrix(weight: torch.Tensor, kind: TargetKind) -> torch.Tensor:
    """W as (out, in) — a view, no copy."""
    return weight.t() if kind == "conv1d" else weight


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _expand(spec: str | Sequence[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns: list[str] = []
    for item in items:
        patterns.extend(TARGET_SETS.get(item, (item,)))
    return patterns


def matches_spec(name: str, targets: str | Sequence[str]) -> bool:
    """Whether module ``name`` is selected by ``targets`` (the spec ``find_targets`` takes)."""
    return any(_matches(name, p) for p in _expand(targets))


def find_targets(model: nn.Module, targets: str | Sequence[str] = "mlp") -> list[Target]:
    """The model's target matrices, in module order.

    ``targets``: "mlp" (default, as the reference code), "attn", "all", or a list mixing those set
    names with module names / dotted suffixes ("q_proj", "layers.3.mlp.down_proj", a full name).
    Every explicit pattern must match at least one linear layer; the result is never empty.
    """
    patterns = _expand(targets)
    found: list[Target] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        kind = target_kind(module)
        if kind is None:
            continue
        hits = [p for p in patterns if _matches(name, p)]
        if not hits:
            continue
        used.update(hits)
        w = weight_matrix(module.weight, kind)
        found.append(Target(name, kind, out_features=w.shape[0], in_features=w.shape[1]))
    explicit = [t for t in _as_list(targets) if t not in TARGET_SETS]
    missing = [p for p in explicit if p not in used]
    if missing:
        raise ValueError(f"target patterns matched no linear layer: {missing}")
    if not found:
        raise ValueError(f"no target layers for {targets!r} in {type(model).__name__}")
    return found


def _as_list(spec: str | Iterable[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)
