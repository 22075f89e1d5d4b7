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
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adaptation: Any = None  # an adapters-side Adaptation; None = base weights


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


class EngineError(Exception):
    """Base of errors the engine reports to callers."""


class QueueFullError(EngineError):
    """More requests waiting than the configured limit (HTTP 429)."""


class PromptTooLongError(EngineError):
    """Prompt + max_tokens do not fit in the model length (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop stopped; no further requests can be served (HTTP 503)."""
