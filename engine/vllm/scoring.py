"""Score requests on vLLM (pass-1 label scoring, few-shot fitness) through prompt log-probabilities.

Nothing is generated freely: each score request becomes one or more vLLM requests of one token with
``prompt_logprobs=0``, which return log p(ids[i] | ids[:i]) for every prompt position i >= 1.
- next-token scores: one request per label id t with prompt + [t]; the log-prob of the appended token
  is log p(t | prompt);
- the continuation's log-likelihood: Σ over i >= continuation_start of the prompt's own log-probs,
  read from the first of those requests (its prompt starts with the whole prompt).
"""
from __future__ import annotations

from typing import Sequence

from engine.contract import ScoreResult, ScoreSpec, TokenLogprob


def score_prompts(prompt_ids: Sequence[int], spec: ScoreSpec) -> list[list[int]]:
    """Prompts of the vLLM requests that answer ``spec`` (each scored with ``prompt_logprobs=0``)."""
    if spec.next_token_ids:
        return [list(prompt_ids) + [int(t)] for t in spec.next_token_ids]
    return [list(prompt_ids)]


def token_logprobs(prompt_logprobs, ids: Sequence[int]) -> list[float | None]:
    """vLLM's ``RequestOutput.prompt_logprobs`` (None, then one {token id: Logprob} per position) ->
    log p(ids[i] | ids[:i]) per position (None at 0)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        raise RuntimeError("vLLM returned no prompt log-probabilities for a score request")
    return [None if d is None else float(d[t].logprob) for d, t in zip(prompt_logprobs, ids)]


def score_result(prompt_ids: Sequence[int], spec: ScoreSpec, logprobs: list[list[float | None]]) -> ScoreResult:
    """Combine the per-position log-probs of the requests of ``score_prompts`` (same order)."""
    n = len(prompt_ids)
    result = ScoreResult([float(lp[n]) for lp in logprobs] if spec.next_token_ids else [])
    cs = spec.continuation_start
    if cs is not None and cs < n:
        span = logprobs[0][max(cs, 1):n]
        result.continuation_logprob = float(sum(span))
        result.continuation_tokens = len(span)
    return result


def prompt_token_logprobs(prompt_logprobs, ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """vLLM's ``prompt_logprobs`` (asked with k) -> each prompt position's TokenLogprob with its k most likely
    alternatives (None at 0), as the native engine answers ``ScoreSpec.prompt_logprobs``."""
    out: list[TokenLogprob | None] = [None]
    for d, t in zip(prompt_logprobs[1:len(ids)], ids[1:]):
        top = sorted(((int(i), float(v.logprob)) for i, v in d.items()), key=lambda x: -x[1])
        out.append(TokenLogprob(int(t), float(d[t].logprob), top[:k]))
    return out
