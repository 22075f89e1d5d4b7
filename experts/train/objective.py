"""The training objectives as functions of token ids: REINFORCE with an optional KL term, and the
next-token (teacher-forced) objective. Reference recipe: REFERENCE.md §1.

Gradients reach z because every forward here runs inside the runtime's table for an Adaptation whose z
requires grad: the adaptive layers then take the factored path y = ((x V) ⊙ s(z)) Uᵀ, and s(z) is the
differentiable SVF composition (the SVD factors are constants).

Only the positions of generated tokens go through the LM head, in chunks, so the (tokens × vocab)
logits never exist for the whole batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

_HEAD_CHUNK = 1024  # positions per LM-head chunk: 1024 x 49152 fp32 logits = 192 MiB


@dataclass
class TokenBatch:
    """Prompt + completion per row, right-padded."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    scored: torch.Tensor  # (B, T) bool, True on completion tokens (the ones whose log-prob counts)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def pack(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, device) -> TokenBatch:
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, T = len(lens), max(lens)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    scored = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :lens[i]] = torch.tensor(list(p) + list(c), dtype=torch.long)
        mask[i, :lens[i]] = 1
        scored[i, len(p):lens[i]] = True
    return TokenBatch(ids.to(device), mask.to(device), scored.to(device))


def _scored_hidden(body, batch: TokenBatch, pred: torch.Tensor) -> torch.Tensor:
    """Hidden states (N, d) at the positions that predict a completion token."""
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state[:, :-1][pred]


def scored_logprobs(model, batch: TokenBatch, ref_model_ctx=None):
    """Log-probs of the completion tokens, and optionally the KL to the reference model.

    Returns (logp (B,), kl (B,) or None, n_tokens (B,)): per row, Σ_t log π(y_t | x, y_<t) over its
    completion tokens; with ``ref_model_ctx`` (a context manager under which ``model`` is the reference,
    e.g. ``runtime.activate(None)``: the base weights), also Σ_t KL(π_ref(·|…) ‖ π(·|…)) over the same
    positions, on the full vocabulary.
    """
    body, head = model.base_model, model.get_output_embeddings()
    pred = batch.scored[:, 1:]  # (B, T-1): position t predicts token t+1
    rows = torch.arange(batch.rows, device=pred.device)[:, None].expand_as(pred)[pred]  # (N,)
    targets = batch.input_ids[:, 1:][pred]  # (N,)
    h = _scored_hidden(body, batch, pred)  # (N, d)
    h_ref = None
    if ref_model_ctx is not None:
        with torch.no_grad(), ref_model_ctx:
            h_ref = _scored_hidden(body, batch, pred)
    logp_tok, kl_tok = [], []
    for s in range(0, h.shape[0], _HEAD_CHUNK):
        logp = F.log_softmax(head(h[s:s + _HEAD_CHUNK]).float(), dim=-1)  # (n, V)
        logp_tok.append(logp.gather(1, targets[s:s + _HEAD_CHUNK, None]).squeeze(1))
        if h_ref is not None:
            with torch.no_grad():
                ref = F.log_softmax(head(h_ref[s:s + _HEAD_CHUNK]).float(), dim=-1)  # (n, V)
            kl_tok.append((ref.exp() * (ref - logp)).sum(-1))
    zeros = torch.zeros(batch.rows, device=h.device)
    logp_rows = zeros.index_add(0, rows, torch.cat(logp_tok)) if logp_tok else zeros
    kl_rows = None
    if ref_model_ctx is not None:
        kl_rows = zeros.index_add(0, rows, torch.cat(kl_tok)) if kl_tok else zeros
    n_tok = torch.zeros(batch.rows, device=h.device).index_add(0, rows, torch.ones_like(rows, dtype=torch.float))
    return logp_rows, kl_rows, n_tok


def reinforce_loss(logp: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                   denom: int) -> torch.Tensor:
    """Σ_j (−logp_j · r_j + λ·KL_j) / denom.  logp, rewards, kl: (B,).

    ``denom`` is the size of the whole batch, so summing the losses of its micro-batches gives the
    reference's batch mean (and their gradients add up to its gradient).
    """
    loss = -(logp * rewards.to(logp.dtype))
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl
    return loss.sum() / denom


def next_token_loss(logp: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Mean negative log-likelihood per completion token over the whole batch.  logp: (B,) sums."""
    return -logp.sum() / max(total_tokens, 1)
