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


FAILED = -1  # the token of a row that could not be sampled


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose logits hold NaN or +inf, or only -inf (no token can be chosen from them).
    One reduction: max propagates NaN."""
    return ~torch.isfinite(logits.max(dim=-1).values)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
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
    probs = sub.softmax(dim=-1)
    for j, i in enumerate(idx):
        try:
            out[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
        except RuntimeError:  # NaN, inf or no mass left in this row's probabilities
            out[i] = FAILED
    return out
