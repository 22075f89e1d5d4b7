"""Adaptations as LoRA factors (for engines that serve LoRA adapters, such as vLLM): pure tensor math.

- SAPT: the request's mixture Σ_t a_t·s·B_t A_t is one LoRA of rank T·r with the attention folded into
  B (exact):  A = [A_1; …; A_T] (T·r × in),  B = s·[a_1 B_1 … a_T B_T] (out × T·r).
- Several changes of one matrix add up: their factors are concatenated along the rank.

SVF is not served as LoRA: a full-rank SVF change needs ranks in the hundreds to stay within 10% error on
SmolLM2's shipped experts, while vLLM's per-row scales serve it exactly (``engine/vllm/rows.py``).

Every factor lives in B (scaling 1); ``engine/vllm/peft_folder.py`` writes them as the PEFT folder vLLM reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapters.sapt import row_lora_scale


@dataclass
class LoraFactors:
    """One matrix's low-rank change ΔW ≈ B A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r), scaling folded in

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is (the factors are cast to the model dtype when written)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --- SAPT: folding the attention into B ------------------------------------------------------------

def sapt_lora(A_cat: torch.Tensor, B_cat: torch.Tensor, attention: torch.Tensor, rank: int) -> LoraFactors:
    """One request's SAPT mixture on one matrix.  A_cat: (T·r, in), B_cat: (out, T·r) with s = alpha/r
    folded in (``SAPTBundle.stacked_lora``), attention: (T,) -> B A = Σ_t a_t s B_t A_t exactly."""
    wd = _work_dtype(A_cat.dtype, B_cat.dtype)
    scale = row_lora_scale(attention.detach().to(wd)[None], rank)[0]  # (T·r,)
    return LoraFactors(A_cat.detach().to(wd), B_cat.detach().to(wd) * scale.to(B_cat.device))


def concat(parts: list[LoraFactors]) -> LoraFactors:
    """Σ_j B_j A_j as one LoRA: the factors stacked along the rank."""
    if len(parts) == 1:
        return parts[0]
    return LoraFactors(torch.cat([p.A for p in parts], 0), torch.cat([p.B for p in parts], 1))


def rel_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """‖exact − approx‖ / ‖exact‖ in float64 (0 when both are zero)."""
    e, a = exact.detach().double(), approx.detach().double()
    n = float(e.norm())
    return float((e - a).norm()) / n if n > 0 else (0.0 if float(a.norm()) == 0 else math.inf)
