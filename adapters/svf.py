"""SVF (Transformer², singular value fine-tuning) as pure tensor functions.

An expert is one vector z (k,) per adapted matrix W = U diag(σ) Vᵀ (out × in, k = min(out, in)).
Two parametrizations (REFERENCE.md §1):
- ``sakana`` (reference code, the default): m = sigmoid(z), W' = U diag(σ⊙m) Vᵀ · Σσ / Σ(σ⊙m).
- ``direct`` (paper formula): W' = U diag(σ⊙z) Vᵀ.
Both reduce to one per-matrix scale vector s (k,) with W' = U diag(s) Vᵀ; everything downstream (the
merged weight, the factored per-row path) only sees s. Mixtures interpolate z, never W:
z' = Σ_k α_k z_k. All functions are differentiable in z and α; U, σ, V are constants (the SVD is never
differentiated).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Parametrization = Literal["sakana", "direct"]
PARAMETRIZATIONS = ("sakana", "direct")


def check_parametrization(p: str) -> Parametrization:
    if p not in PARAMETRIZATIONS:
        raise ValueError(f"unknown SVF parametrization {p!r}; expected one of {PARAMETRIZATIONS}")
    return p  # type: ignore[return-value]


def neutral_z(k: int, parametrization: Parametrization, dtype=torch.float32) -> torch.Tensor:
    """A z that leaves W unchanged: any constant works for sakana (the rescale undoes it), ones for
    direct."""
    check_parametrization(parametrization)
    return torch.ones(k, dtype=dtype) if parametrization == "direct" else torch.zeros(k, dtype=dtype)


def init_z(k: int, parametrization: Parametrization, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training start as in the reference code: 0.1 + 0.01·N(0,1) (sakana), 1 + 0.01·N(0,1) (direct)."""
    base = 0.1 if check_parametrization(parametrization) == "sakana" else 1.0
    return base + 0.01 * torch.randn(k, generator=generator)


def mix_z(zs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """z' = Σ_k α_k z_k.  zs: (K, k), alpha: (K,) -> (k,)."""
    return alpha.to(zs.dtype) @ zs


def svf_scale(sigma: torch.Tensor, z: torch.Tensor, parametrization: Parametrization) -> torch.Tensor:
    """Effective singular values s (k,) with W' = U diag(s) Vᵀ.  sigma, z: (k,) -> (k,).

    Computed in sigma's dtype (float32+) whatever z's dtype is (experts are often stored in bf16).
    """
    z = z.to(sigma.dtype)
    if check_parametrization(parametrization) == "direct":
        return sigma * z
    # σ⊙m · Σσ / Σ(σ⊙m) (the nuclear-norm rescale keeps Σ singular values fixed, so only the relative shape
    # of m matters) computed as Σσ · softmax(log σ + log m): the same value, but finite for every finite z
    # (m = sigmoid(z) underflows to 0 for z below about -100, and the plain quotient is then 0/0).
    return sigma.sum() * torch.softmax(torch.log(sigma) + F.logsigmoid(z), dim=-1)


def svf_scale_segments(
    sigma: torch.Tensor, z: torch.Tensor, segments: torch.Tensor, num_segments: int, parametrization: Parametrization
) -> torch.Tensor:
    """``svf_scale`` of many matrices at once, their vectors laid end to end.

    sigma, z: (..., K) with matrix ``segments[j]`` owning column j (segments: (K,) int64, values in
    [0, num_segments)) -> (..., K). The sakana rescale is a softmax within each matrix's columns.
    """
    z = z.to(sigma.dtype)
    if check_parametrization(parametrization) == "direct":
        return sigma * z
    t = torch.log(sigma) + F.logsigmoid(z)
    shape = t.shape[:-1] + (num_segments,)
    idx = segments.expand_as(t)
    peak = torch.full(shape, float("-inf"), dtype=t.dtype, device=t.device).scatter_reduce(-1, idx, t, "amax")
    e = torch.exp(t - peak.gather(-1, idx))
    total = torch.zeros(shape, dtype=t.dtype, device=t.device).scatter_add(-1, idx, e)
    sigma_sum = torch.zeros(shape, dtype=t.dtype, device=t.device).scatter_add(-1, idx, sigma.expand_as(t))
    return sigma_sum.gather(-1, idx) * e / total.gather(-1, idx)


def merged_weight(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """W' = U diag(s) Vᵀ.  U: (out, k), s: (k,), Vh: (k, in) -> (out, in), in float32+ then U's dtype."""
    wd = s.dtype
    return ((U.to(wd) * s) @ Vh.to(wd)).to(U.dtype)


def merged_delta_weight(
    W: torch.Tensor, U: torch.Tensor, sigma: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor
) -> torch.Tensor:
    """W' computed as W + U diag(s − σ) Vᵀ.  W: (out, in) -> (out, in).

    Same value as ``merged_weight`` in exact arithmetic, but the rounding of U and V (stored in the
    model dtype, e.g. bf16) only touches the change: a neutral expert gives back W to float32
    precision instead of bf16 reconstruction error.
    """
    wd = s.dtype
    delta = (U.to(wd) * (s - sigma.to(wd))) @ Vh.to(wd)
    return (W.to(wd) + delta).to(W.dtype)


def factored_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    Vh: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x V) ⊙ s) Uᵀ + b, the exact SVF layer without materialising W'.

    x: (B, T, in); U: (out, k); Vh: (k, in); s: (k,) or per row (B, 1, k) -> (B, T, out).
    Two thin GEMMs (in→k, k→out) instead of one; both are ``F.linear`` on row-major weights.
    """
    h = F.linear(x, Vh)  # (B, T, k)
    return F.linear(h * s, U, bias)  # (B, T, out)
