"""Token selection: pure functions over a batch of logits with explicit random generators."""
from __future__ import annotations

from collections import Counter

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
    """Penalties, biases and minimum lengths of the rows listed (the others are untouched): the (row, token)
    entries each rule touches are gathered on the host, then every row is processed in a few batched ops.
    Small tensors per row and per rule cost a step of 128 rows on the GPU more kernel launches than its
    forward (penalties ran at 0.42x of plain there).

    rows: (row index, SamplingParams, prompt ids, output ids, end ids: EOS unless ignored, and stop_token_ids)
    -> logits (B, V) float32. As vLLM applies them: the repetition penalty over prompt and output tokens,
    the frequency and presence penalties over output tokens, then the bias, then min_tokens' mask."""
    logits = logits.float().clone()
    dev = logits.device
    rep_at: list[tuple[int, int]] = []  # (row, token) seen in the prompt or the output
    rep_by: list[float] = []
    add_at: list[tuple[int, int]] = []  # (row, token) += value: frequency and presence penalties, biases
    add: list[float] = []
    ban_at: list[tuple[int, int]] = []  # (row, token) = -inf: ends before min_tokens
    for i, p, prompt, output, ends in rows:
        if p.repetition_penalty != 1.0:
            seen = set(prompt) | set(output)
            rep_at += [(i, t) for t in seen]
            rep_by += [p.repetition_penalty] * len(seen)
        if (p.frequency_penalty or p.presence_penalty) and output:
            for t, n in Counter(output).items():
                add_at.append((i, t))
                add.append(-(p.frequency_penalty * n + p.presence_penalty))
        for t, b in (p.logit_bias or {}).items():
            add_at.append((i, t))
            add.append(b)
        if p.min_tokens and len(output) < p.min_tokens:
            ban_at += [(i, t) for t in ends]

    def index(at: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.tensor(at, dtype=torch.long).to(dev, non_blocking=True)
        return both[:, 0], both[:, 1]

    if rep_at:  # each (row, token) once: the new value is computed from the old one
        at, pen = index(rep_at), torch.tensor(rep_by).to(dev, non_blocking=True)
        vals = logits[at]
        logits[at] = torch.where(vals > 0, vals / pen, vals * pen)
    if add_at:
        logits.index_put_(index(add_at), torch.tensor(add, dtype=logits.dtype).to(dev, non_blocking=True),
                          accumulate=True)
    if ban_at:
        logits[index(ban_at)] = float("-inf")
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
