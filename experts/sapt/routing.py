"""SAPT routing as training and evaluation compute it: the same masked max-pool, query projection and
softmax the server's ``sapt`` strategy applies to one prompt (``experts.pass1.resolver.sapt_attention``),
here for a right-padded batch of prompts (padding is masked, so each row's weights equal its own).

Also the ARM term, the bundle copies that evaluation serves, and the constraint that keeps the query
projection's first layer blind to the component all prompts share.
"""
from __future__ import annotations

import uuid
from typing import Sequence

import torch

from adapters.sapt import SAPTBundle, pool_query
from experts.store.sapt_tensors import bundle_from_tensors, bundle_tensors


def pad_prompts(prompts: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and mask (B, L) bool, True on prompt tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = True
    return ids.to(device), mask.to(device)


def prompt_attention(model, bundle: SAPTBundle, prompts: Sequence[list[int]]) -> torch.Tensor:
    """(B, T) attention of each prompt over the bundle's tasks; differentiable in the bundle's keys and
    query projection (the input embeddings are frozen)."""
    emb = model.get_input_embeddings()
    ids, mask = pad_prompts(prompts, emb.weight.device)
    with torch.no_grad():
        x = emb(ids)  # (B, L, d)
    p = next(bundle.parameters())
    return bundle.attention(x.to(p.device, p.dtype), mask.to(p.device))


@torch.no_grad()
def batched_attention(model, bundle: SAPTBundle, prompts: Sequence[list[int]], chunk: int = 256) -> torch.Tensor:
    """``prompt_attention`` without gradients, in chunks: (N, T) float32 on the CPU."""
    parts = [prompt_attention(model, bundle, prompts[s:s + chunk]).float().cpu() for s in range(0, len(prompts), chunk)]
    return torch.cat(parts)


@torch.no_grad()
def shared_direction(model, prompts: Sequence[list[int]]) -> torch.Tensor:
    """(d,) unit vector along the mean masked max-pooled embedding of ``prompts``."""
    emb = model.get_input_embeddings()
    ids, mask = pad_prompts(prompts, emb.weight.device)
    mean = pool_query(emb(ids).float(), mask).mean(0)
    return (mean / mean.norm()).cpu()


@torch.no_grad()
def project_out(weight: torch.Tensor, direction: torch.Tensor) -> None:
    """weight (h, d) <- weight − (weight u) uᵀ: its rows become orthogonal to the unit vector u (d,)."""
    u = direction.to(weight.device, weight.dtype)
    weight -= torch.outer(weight @ u, u)


def arm_kl(stored: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p ‖ q) = Σ_t p_t (log p_t − log q_t).  stored p: (B, T), each row the mean
    attention its task had when it was learned, zero-padded for the tasks learned since (0·log 0 = 0);
    attention q: (B, T)."""
    q = attention.clamp_min(torch.finfo(attention.dtype).tiny)
    return (torch.xlogy(stored, stored) - stored * q.log()).sum(-1).mean()


def pad_to(vec: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([vec, vec.new_zeros(size - vec.shape[0])])


def serving_copy(bundle: SAPTBundle, device=None) -> SAPTBundle:
    """A frozen copy in exactly the form the store serves (float32 tensors through the store's layout),
    with its own id, so evaluation measures what a server would answer."""
    frozen = bundle_from_tensors(bundle_tensors(bundle), bundle.alpha, bundle_id=f"eval-{uuid.uuid4().hex[:12]}",
                                 target_order=bundle.target_names)
    return frozen.to(device if device is not None else next(bundle.parameters()).device)
