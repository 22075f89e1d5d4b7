"""Token selection: pure functions over a batch of logits with explicit random generators."""
from __future__ import annotations

import torch

# Below this temperature a row is greedy: dividing logits by a (float32) temperature this small makes
# them infinite, and the probabilities NaN.
MIN_TEMPERATURE = 1e-6


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf.

    logits: (B, V) float32, already divided by temperature; top_k: (B,) int (0 = off); top_p: (B,) float.
    """
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep a token if the mass strictly before it is below top_p (the top token is always kept).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # even for a top_p that float32 rounds to 0
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def process_logits(logits: torch.Tensor, rows: list[tuple[int, object, list[int], list[int], list[int]]]) -> torch.Tensor:
    """Penalties, biases and minimum lengths, row by row (only the rows listed; the others are untouched).

    rows: (row index, SamplingParams, prompt ids, output ids, end ids: EOS unless ignored, and stop_token_ids)
    -> logits (B, V) float32. As vLLM applies them: the repetition penalty over prompt and output tokens,
    the frequency and presence penalties over output tokens, then the bias, then min_tokens' mask."""
    logits = logits.float().clone()
    V = logits.shape[1]
    for i, p, prompt, output, ends in rows:
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and output:
            counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=row.device), minlength=V)[:V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
        if p.min_tokens and len(output) < p.min_tokens and ends:
            row[torch.tensor(ends, dtype=torch.long, device=row.device)] = float("-inf")
    return logits


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's largest (logits already tempered)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))


FAILED = -1  # the token of a row that could not be sampled


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose logits hold NaN or +inf, or only -inf (no token can be chosen from them).
    One reduction: max propagates NaN."""
    return ~torch.isfinite(logits.max(dim=-1).values)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None], min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row. logits: (B, V); temperature/top_k/top_p: (B,); generators: one per row.

    Rows with temperature 0 (or below MIN_TEMPERATURE) or top_k 1 take the argmax. A row with its own
    generator draws from it alone, so its tokens do not depend on what else is in the batch. A row whose
    distribution cannot be sampled gets ``FAILED``; the other rows are not affected.
    """
    logits = logits.float()
    greedy = (temperature < MIN_TEMPERATURE) | (top_k == 1)
    bad = unusable_rows(logits)
    out = torch.where(bad, FAILED, logits.argmax(dim=-1))
    if bool((greedy | bad).all()):
        return out
    idx = (~greedy & ~bad).nonzero().flatten().tolist()
    sub = logits[idx] / temperature[idx, None]
    sub = filter_logits(sub, top_k[idx], top_p[idx])
    if min_p is not None and bool((min_p[idx] > 0).any()):
        sub = min_p_filter(sub, min_p[idx])
    probs = sub.softmax(dim=-1)
    for j, i in enumerate(idx):
        try:
            out[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
        except RuntimeError:  # NaN, inf or no mass left in this row's probabilities
            out[i] = FAILED
    return out
