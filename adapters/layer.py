"""The adaptive linear layer: one target nn.Linear / Conv1D, applied per batch row.

It keeps the original weight and bias (same Parameter objects, same state-dict names) and the SVD
factors of W, and reads the step table the runtime made active. Per forward, for input x (B, T, in):
- no table, or nothing for this layer:   y = x Wᵀ + b                    (the base model, untouched)
- one adaptation for every row, merged:  y = x W'ᵀ + b                   (cached W', one GEMM)
- rows with different SVF mixtures:      y = ((x V) ⊙ s[row]) Uᵀ + b     (exact, two thin GEMMs)
  rows without SVF use s = σ (U diag(σ) Vᵀ = W up to rounding);
- plus, for SAPT rows:                   y += ((x Aᵀ) ⊙ a[row]⊗1_r) Bᵀ  (one rank-T·r LoRA per bundle)
Layers never look experts up; all per-row tensors are prepared once per table by the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.sapt import lora_delta
from adapters.svd_cache import SVDFactors
from adapters.svf import factored_linear
from adapters.targets import Target


@dataclass
class TargetStep:
    """What one target layer does in the active step (built by ``AdaptationRuntime.plan``)."""

    merged: torch.Tensor | None = None  # (out, in) W' shared by all rows; wins over `scale`
    scale: torch.Tensor | None = None  # (B, 1, k) per-row singular values; None = x Wᵀ for all rows
    lora: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # ^ per SAPT bundle: A_cat (R, in), B_cat (out, R) with alpha/r folded in, row scale (B, 1, R)


class ActiveTable:
    """The slot shared by the runtime (writer) and its layers (readers)."""

    def __init__(self):
        self.table = None  # adapters.runtime.StepTable | None


class AdaptiveLinear(nn.Module):
    """Drop-in replacement of a target linear layer (see module docstring)."""

    def __init__(self, original: nn.Module, target: Target, factors: SVDFactors, slot: ActiveTable):
        super().__init__()
        self.target = target
        self.name = target.name
        self.in_features, self.out_features = target.in_features, target.out_features
        if target.kind == "conv1d":  # the attribute names model code may read off a Conv1D
            self.nf, self.nx = target.out_features, target.in_features
        self.weight = original.weight  # (out, in), or (in, out) for Conv1D
        self.bias = original.bias
        # Not persistent: the model's state dict stays exactly the base model's.
        self.register_buffer("U", factors.U, persistent=False)  # (out, k)
        self.register_buffer("S", factors.S, persistent=False)  # (k,) float32+
        self.register_buffer("Vh", factors.Vh, persistent=False)  # (k, in)
        self.slot = slot

    def extra_repr(self) -> str:
        return f"{self.name}, {self.target.kind}, in={self.in_features}, out={self.out_features}, k={self.target.rank}"

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly what the replaced module computed."""
        if self.target.kind == "conv1d":  # same ops as transformers' Conv1D: addmm on the 2-D view
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        table = self.slot.table
        step = None if table is None else table.layer_state.get(self.name)
        if step is None:
            return self.base_forward(x)
        if x.shape[0] != table.rows.shape[0]:
            raise RuntimeError(
                f"{self.name}: input has {x.shape[0]} rows but the active step table has {table.rows.shape[0]}"
            )
        if step.merged is not None:
            y = F.linear(x, step.merged, self.bias)
        elif step.scale is None:
            y = self.base_forward(x)
        else:
            y = factored_linear(x, self.U, step.scale, self.Vh, self.bias)
        for A_cat, B_cat, row_scale in step.lora:
            y = y + lora_delta(x, A_cat, B_cat, row_scale)
        return y
