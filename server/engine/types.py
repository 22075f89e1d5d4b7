"""Plain data crossing the engine boundary. The HTTP layer builds ``GenerationRequest``s and consumes
``RequestOutput``s; nothing here holds tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None  # same seed + same prompt + same params -> same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end the sequence
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class ScoreSpec:
    """Score the prompt instead of generating (pass 1, few-shot fitness): one prefill forward, no decode."""

    next_token_ids: list[int] = field(default_factory=list)  # log p(t | prompt) for each of these tokens
    continuation_start: int | None = None  # also Σ log p(prompt[i] | prompt[:i]) over i >= this index


@dataclass
class ScoreResult:
    next_logprobs: list[float]  # aligned with ScoreSpec.next_token_ids
    continuation_logprob: float | None = None  # summed over the continuation's tokens
    continuation_tokens: int = 0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adaptation: Any = None  # an adapters-side Adaptation; None = base weights
    score: ScoreSpec | None = None  # set: score the prompt, generate nothing
    prefix_len: int = 0  # leading prompt tokens shared by many requests: their KV is computed once and reused


@dataclass
class RequestOutput:
    """What one engine step produced for one request (incremental)."""

    request_id: str
    token_ids: list[int]  # tokens new since the previous output
    text: str  # text new since the previous output (stop strings cut off, held back while ambiguous)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    error: str | None = None  # set when the engine failed this request
    scores: ScoreResult | None = None  # for score requests


class EngineError(Exception):
    """Base of errors the engine reports to callers."""


class QueueFullError(EngineError):
    """More requests waiting than the configured limit (HTTP 429)."""


class PromptTooLongError(EngineError):
    """Prompt + max_tokens do not fit in the model length (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop stopped; no further requests can be served (HTTP 503)."""
