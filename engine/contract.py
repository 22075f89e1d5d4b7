"""The engine contract: the plain data crossing the engine boundary (callers build ``GenerationRequest``s
and consume ``RequestOutput``s; nothing here holds tensors), the ``Engine`` protocol both engines satisfy,
``stream_outputs`` (an engine thread's outputs as an async iterator), ``Handoff`` (how they cross to the
caller's thread) and ``check_admission``, the one check every engine runs before it accepts a request."""
from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol, runtime_checkable

from adapters.adaptation import Adaptation

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Structure:
    """What a request's output must parse as (structured outputs): a grammar engine masks every step's
    tokens to the ones that keep the text inside it.

    kind: json (value: a JSON schema, as JSON text) | json_object (any JSON object; value None) |
    regex (value: the pattern) | choice (value: the allowed strings, one of which is the whole output) |
    grammar (value: EBNF, GBNF dialect, rule ``root``)."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    value: str | tuple[str, ...] | None = None


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
    presence_penalty: float = 0.0  # minus this for every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # minus this times each token's count in the generated text (OpenAI)
    repetition_penalty: float = 1.0  # logits of tokens in prompt or output: /p if positive, *p if not (vLLM)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logit of each token (OpenAI)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (sampled rows)
    min_tokens: int = 0  # EOS and stop_token_ids are not chosen before this many tokens
    logprobs: int | None = None  # per generated token: its log-probability and this many top alternatives
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text in it
    skip_special_tokens: bool = True  # leave special tokens out of the text
    structure: Structure | None = None  # the output must parse as this (structured outputs)

    @property
    def processed(self) -> bool:
        """Whether the logits go through ``engine.native.sampling.process_logits`` before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class ScoreSpec:
    """Score the prompt instead of generating (pass 1, few-shot fitness): one prefill forward, no decode."""

    next_token_ids: list[int] = field(default_factory=list)  # log p(t | prompt) for each of these tokens
    continuation_start: int | None = None  # also Σ log p(prompt[i] | prompt[:i]) over i >= this index
    prompt_logprobs: int | None = None  # also every prompt token's log-prob and this many top alternatives (echo)


@dataclass
class ScoreResult:
    next_logprobs: list[float]  # aligned with ScoreSpec.next_token_ids
    continuation_logprob: float | None = None  # summed over the continuation's tokens
    continuation_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt position (None at 0), when asked for


USER, BACKGROUND = 0, 1  # request priorities: lower is admitted first (vLLM's convention)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adaptation: Adaptation | None = None  # None = the base weights
    score: ScoreSpec | None = None  # set: score the prompt, generate nothing
    prefix_len: int = 0  # leading prompt tokens shared by many requests: their KV is computed once and reused
    priority: int = 0  # USER, or BACKGROUND (few-shot fitness): admitted only while no user request waits


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties and temperature, as vLLM
    reports by default) and the most likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
    bad_request: bool = False  # the error is the request's own (its structure has no way on): HTTP 400, not 500
    error_code: str | None = None  # with bad_request: what clients branch on (default structure_dead_end)
    scores: ScoreResult | None = None  # for score requests
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked for them
    stop_reason: int | str | None = None  # finished by a stop string (it) or one of stop_token_ids (it); else None


class EngineError(Exception):
    """Base of errors the engine reports to callers."""


class QueueFullError(EngineError):
    """More requests waiting than the configured limit (HTTP 429)."""


class PromptTooLongError(EngineError):
    """Prompt + max_tokens do not fit in the model length (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop stopped; no further requests can be served (HTTP 503)."""


def check_admission(request: GenerationRequest, max_model_len: int, pending: int, capacity: int,
                    score_budget: int = 0) -> None:
    """The one admission check of every engine: raise ``PromptTooLongError`` when the prompt is empty or
    does not fit with its token budget (``score_budget`` for a score request), ``QueueFullError`` when
    ``pending`` accepted requests already fill ``capacity``."""
    n = len(request.prompt_ids)
    if n == 0:
        raise PromptTooLongError("the prompt is empty")
    budget = score_budget if request.score is not None else request.params.max_tokens
    if n + budget > max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {n} "
            f"tokens and max_tokens is {budget}")
    if pending >= capacity:
        raise QueueFullError(f"too many waiting requests ({pending}); retry later")


@runtime_checkable
class AdaptationCheck(Protocol):
    """The one validation of an adaptation, which both engines implement (the native engine's
    ``AdaptationRuntime``, the vLLM engine's ``RowsView``): the HTTP edge asks it once per decision."""

    targets: list  # the adapted matrices (``adapters.targets.Target``)

    def validate(self, adaptation: Adaptation) -> None:
        """Raise ValueError, saying why, when this engine cannot serve ``adaptation`` exactly."""


@runtime_checkable
class Engine(Protocol):
    """What callers may use of an engine. Requests are token ids in, ``RequestOutput``s out."""

    tokenizer: Any  # the model's Hugging Face tokenizer
    model_name: str  # the name clients use
    max_model_len: int  # prompt + generated tokens per sequence
    eos_token_ids: list[int]
    runtime: AdaptationCheck | None  # validates adaptations, knows the targets; None without adapted matrices
    model: Any  # the base model's weights as a torch module (fingerprints, SAPT embeddings), or None
    adaptation: dict  # how far the adaptive layers are: {"phase": "ready" | "svd" | "failed", "percent", ...}

    @property
    def ready(self) -> bool:
        """True while requests can be served."""

    def start(self) -> None:
        """Start serving (from the event loop that will consume the outputs)."""

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work, abort what is in flight, release the model."""

    def stats(self) -> dict:
        """At least ``running`` and ``waiting`` (sequences), read by the metrics endpoint."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue ``request``; raise at once (QueueFullError, PromptTooLongError, EngineDeadError) if it
        cannot be; otherwise its outputs, the last one ``finished``. Leaving early aborts it. A request
        with ``score`` generates nothing and answers once, with ``scores``."""

    async def abort(self, request_id: str) -> None:
        """End a request early; its stream ends with finish reason "abort"."""

    async def wait_adaptation(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the adaptive layers (prepared in the background at start);
        whether adapted requests are served now. An adapted request sent before waits in the engine."""


class Handoff:
    """Outputs an engine thread hands to the streams of callers' event loops: queued per loop and delivered
    in batches, one wake-up of a loop for whatever piled up since its last one. Waking the loop for each
    output (``call_soon_threadsafe`` per token) took 30 us per output against 7.5 us batched
    (``bench/handoff.py``: 256 streams of 128 tokens, 2 CPU cores): a step of 256 rows spent 7 ms there,
    holding the GIL that vLLM's output handler needs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> [pending, wake-up due]

    def put(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, out: "RequestOutput") -> None:
        """Queue ``out`` for ``q`` on ``loop`` (from any thread; dropped when ``loop`` is closed)."""
        with self._lock:
            box = self._loops.get(loop)
            if box is None:
                box = self._loops[loop] = [[], False]
            box[0].append((q, out))
            if box[1]:
                return
            box[1] = True
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # the loop is closed: nobody listens any more
            with self._lock:
                self._loops.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            box = self._loops.get(loop)
            if box is None:
                return
            items, box[0], box[1] = box[0], [], False
        for q, out in items:
            q.put_nowait(out)


async def stream_outputs(q: asyncio.Queue, on_exit: Callable[[bool], None]) -> AsyncIterator[RequestOutput]:
    """The outputs an engine thread puts into ``q``, up to the finished one. ``on_exit(finished)`` runs
    however the consumer leaves (``finished`` False: it left early and the request is to be aborted)."""
    finished = False
    try:
        while not finished:
            out: RequestOutput = await q.get()
            finished = out.finished
            yield out
    finally:
        on_exit(finished)
