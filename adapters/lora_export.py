"""Adaptations as LoRA factors (for engines that serve LoRA adapters, such as vLLM): pure tensor math.

- SAPT: the request's mixture Σ_t a_t·s·B_t A_t is one LoRA of rank T·r with the attention folded into
  B (exact):  A = [A_1; …; A_T] (T·r × in),  B = s·[a_1 B_1 … a_T B_T] (out × T·r).
- SVF: the change ΔW = W' − W = U diag(s − σ) Vᵀ (s: the adaptation's effective singular values). Its
  singular values are |s_i − σ_i| with the SVD's own singular vectors, so the best rank-k approximation
  keeps the k largest |s_i − σ_i|:  A = Vᵀ[kept] (k × in),  B = U[:, kept]·(s − σ)[kept] (out × k).
  k is the smallest rank whose relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ is within the budget
  (exact for orthonormal U, V; the factors are held in the model dtype, whose rounding comes on top).
- Both parts of one adaptation on one matrix add up: their factors are concatenated along the rank.

Every factor lives in B (scaling 1); ``engine/vllm/peft_folder.py`` writes them as the PEFT folder vLLM reads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


@dataclass
class MatrixReport:
    """How well a truncated SVF change serves one matrix."""

    name: str
    rank: int  # singular directions kept
    full_rank: int  # k of the matrix's SVD
    rel_error: float  # ‖ΔW − ΔW_k‖ / ‖ΔW‖ (0 when the adaptation leaves the matrix unchanged)
    rel_error_weight: float  # ‖ΔW − ΔW_k‖ / ‖W'‖: the error of the served matrix itself

    def to_dict(self) -> dict:
        return asdict(self)


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is (the factors are cast to the model dtype when written)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --- SVF: truncating the change -------------------------------------------------------------------

def truncation_rank(d: torch.Tensor, budget: float) -> int:
    """Smallest k such that keeping the k largest |d_i| leaves ‖d_dropped‖ / ‖d‖ <= budget.  d: (k,)."""
    d2 = d.detach().double().pow(2).sort(descending=True).values  # (n,)
    total = float(d2.sum())
    if total == 0.0:
        return 0
    tail = torch.cat([d2.flip(0).cumsum(0).flip(0), d2.new_zeros(1)])  # tail[k] = energy left out keeping k
    err = (tail / total).sqrt()  # (n + 1,) error for k = 0..n; summed smallest first, so exact zeros stay 0
    return int((err <= budget).nonzero()[0])


def svf_truncation(name: str, sigma: torch.Tensor, s: torch.Tensor, budget: float) -> tuple[torch.Tensor, MatrixReport]:
    """Which singular directions a rank-k LoRA of ΔW = U diag(s − σ) Vᵀ keeps, and its error.

    sigma, s: (k,) -> (indices of the kept directions (r,), report). Float64 throughout."""
    d = (s.double() - sigma.double())
    k = truncation_rank(d, budget)
    order = d.abs().sort(descending=True).indices
    kept, dropped = order[:k], order[k:]
    err = float(d[dropped].norm())
    total = float(d.norm())
    served = float(s.double().norm())
    report = MatrixReport(name, k, d.numel(), err / total if total > 0 else 0.0, err / served if served > 0 else 0.0)
    return kept.sort().values, report


def svf_lora(U: torch.Tensor, sigma: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor,
             kept: torch.Tensor) -> LoraFactors:
    """ΔW restricted to the kept directions.  U: (out, k), Vh: (k, in), sigma, s: (k,), kept: (r,)."""
    wd = _work_dtype(U.dtype, s.dtype)
    d = (s.to(wd) - sigma.to(wd))[kept.to(sigma.device)]  # (r,)
    A = Vh[kept].to(wd)  # (r, in)
    B = U[:, kept].to(wd) * d  # (out, r)
    return LoraFactors(A, B)


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
