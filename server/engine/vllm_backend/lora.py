"""Adaptations as LoRA adapters for vLLM: pure tensor math, plus the PEFT folder format vLLM reads.

- SAPT: the request's mixture Σ_t a_t·s·B_t A_t is one LoRA of rank T·r with the attention folded into
  B (exact):  A = [A_1; …; A_T] (T·r × in),  B = s·[a_1 B_1 … a_T B_T] (out × T·r).
- SVF: the change ΔW = W' − W = U diag(s − σ) Vᵀ (s: the adaptation's effective singular values). Its
  singular values are |s_i − σ_i| with the SVD's own singular vectors, so the best rank-k approximation
  keeps the k largest |s_i − σ_i|:  A = Vᵀ[kept] (k × in),  B = U[:, kept]·(s − σ)[kept] (out × k).
  k is the smallest rank whose relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ is within the budget
  (exact for orthonormal U, V; the factors are held in the model dtype, whose rounding comes on top).
- Both parts of one adaptation on one matrix add up: their factors are concatenated along the rank.

The adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) with lora_alpha = r,
so the LoRA scaling is 1 and everything lives in B.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.sapt import row_lora_scale

PEFT_PREFIX = "base_model.model."  # PEFT's prefix before the model's own module names
REPORT_FILE = "t2_report.json"  # what the adapter serves, next to the PEFT files


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


# --- the PEFT folder --------------------------------------------------------------------------------

def peft_config(loras: Mapping[str, LoraFactors], base_model: str) -> dict:
    r = max(f.rank for f in loras.values())
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r,  # scaling alpha / r = 1: B carries every factor
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in loras}),
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "inference_mode": True,
    }


def write_peft_adapter(folder: Path, loras: Mapping[str, LoraFactors], base_model: str,
                       dtype: torch.dtype, report: dict | None = None) -> Path:
    """Write ``loras`` (target module name -> factors) as a PEFT LoRA folder; atomic (rename into place).

    Matrices with rank 0 are left out; at least one must remain."""
    loras = {n: f for n, f in loras.items() if f.rank > 0}
    if not loras:
        raise ValueError("an adapter needs at least one matrix with a non-zero change")
    tensors = {}
    for name, f in loras.items():
        if f.A.shape[0] != f.B.shape[1]:
            raise ValueError(f"{name}: A is {tuple(f.A.shape)} but B is {tuple(f.B.shape)}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.to(dtype).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B.to(dtype).contiguous().cpu()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(loras, base_model), indent=1))
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, LoraFactors]]:
    """(adapter_config, target module name -> factors) of a PEFT LoRA folder."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    loras: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ValueError(f"unexpected tensor {key!r} in {folder}")
            name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            loras.setdefault(name, {})[part] = f.get_tensor(key)
    scaling = config["lora_alpha"] / config["r"]
    return config, {n: LoraFactors(p["lora_A"], p["lora_B"] * scaling) for n, p in loras.items()}


def rel_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """‖exact − approx‖ / ‖exact‖ in float64 (0 when both are zero)."""
    e, a = exact.detach().double(), approx.detach().double()
    n = float(e.norm())
    return float((e - a).norm()) / n if n > 0 else (0.0 if float(a.norm()) == 0 else math.inf)
