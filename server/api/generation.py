"""One HTTP generation request as a set of engine requests (one per prompt and choice), merged.

``EngineRun`` submits every choice to the engine up front, so an over-full queue or a prompt that
does not fit is answered (429 / 400) before any response starts; with a ``ClientGate``, the choices
beyond the client's share of the slots are held for it (429 at once when it holds too many) and enter
the engine as its earlier sequences end. It merges the choices' outputs in
arrival order, keeps each choice's text and token counts for the final body or the usage chunk, and
records the request's metrics. ``close`` ends whatever is still running: every engine request of a
run either finishes or is aborted, so a client that goes away never keeps a slot busy.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.types import Receive

from engine.contract import EngineError, GenerationRequest, QueueFullError, RequestOutput, SamplingParams
from server.admission import ClientBusyError, ClientGate
from server.errors import APIError, from_engine_error, invalid_request
from server.metrics import Metrics
from server.schemas import Usage

_DONE = object()  # a pump's last item: its engine stream has ended


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Choice:
    """One choice of the response: which engine request makes it, and what it produced so far."""

    index: int  # OpenAI choice index: prompt_index * n + i
    request: GenerationRequest
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob of every generated token (when asked for)
    pending_logprobs: list = field(default_factory=list)  # those not yet sent in a stream chunk
    logprob_offset: int = 0  # text offset where the next streamed completions logprobs start
    stop_reason: int | str | None = None

    def take_logprobs(self) -> list:
        out, self.pending_logprobs = self.pending_logprobs, []
        return out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sampling_params(body: Any, max_tokens: int, sample_index: int) -> SamplingParams:
    """Engine sampling parameters of choice ``sample_index``; each choice gets its own seed (seed + i)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k filter
        seed=None if body.seed is None else body.seed + sample_index,
        stop=body.stop_list(),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias={int(k): float(v) for k, v in (body.logit_bias or {}).items()},
        min_p=body.min_p,
        min_tokens=min(body.min_tokens, max_tokens),
        logprobs=body.logprob_count(),
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        structure=body.structure(),
    )


def build_choices(request_id: str, body: Any, prompts: list[list[int]], max_tokens: list[int],
                  adaptations: list[Any]) -> list[Choice]:
    choices = []
    for p, (ids, budget, adaptation) in enumerate(zip(prompts, max_tokens, adaptations)):
        for i in range(body.n):
            req = GenerationRequest(f"{request_id}-{p}-{i}", ids, sampling_params(body, budget, i), adaptation)
            choices.append(Choice(p * body.n + i, req))
    return choices


class EngineRun:
    def __init__(self, engine: Any, metrics: Metrics, choices: list[Choice], prompt_tokens: int,
                 arrival: float | None = None, gate: ClientGate | None = None, client: str = ""):
        self.engine, self.metrics, self.choices = engine, metrics, choices
        self.gate, self.client = gate, client  # None: every choice enters the engine at once
        self.prompt_tokens = prompt_tokens  # each prompt once, however many choices it has
        self.arrival = time.monotonic() if arrival is None else arrival  # latencies count from here
        self._first_token_seen = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._direct: AsyncIterator[RequestOutput] | None = None  # one choice, admitted at once: read as is
        self._submitted: list[Choice] = []
        self._entered: set[int] = set()  # choices given an engine place by the gate
        self._released: set[int] = set()  # choices whose place in the gate is given back

    # --- lifecycle -----------------------------------------------------------------------------------
    async def submit(self) -> None:
        """Hand every choice to the engine (those the client's share lets in now); on refusal, abort those
        already handed and raise an APIError."""
        if self.gate is not None:
            try:
                self.gate.reserve(self.client, len(self.choices))
            except ClientBusyError as e:
                raise APIError(429, f"The server is busy: {e}. Retry when your requests have finished.",
                               type="rate_limit_error", code="queue_full") from e
        streams: list[AsyncIterator[RequestOutput] | None] = [None] * len(self.choices)
        try:
            for i, c in enumerate(self.choices):
                if self.gate is not None:
                    if not self.gate.try_enter(self.client):
                        break  # this one and the rest wait for the client's own sequences to end
                    self._entered.add(c.index)
                streams[i] = self.engine.generate(c.request)
                self._submitted.append(c)
        except EngineError as e:
            await self.close()
            raise from_engine_error(e) from e
        self.metrics.count_prompt_tokens(self.prompt_tokens)
        if len(self.choices) == 1 and streams[0] is not None:
            # The common request: its engine stream is read by the response itself, no pump and no second
            # queue between the engine's hand-off and the HTTP writer.
            self._direct = streams[0]
            return
        self._pumps = [asyncio.create_task(self._pump(c, s)) for c, s in zip(self.choices, streams)]

    async def _admitted(self, choice: Choice) -> AsyncIterator[RequestOutput]:
        """The engine stream of a choice that waited for the client's share: once it has a place, and the
        engine's queue (shared with other clients) has room for it."""
        await self.gate.enter(self.client)
        self._entered.add(choice.index)
        while True:
            try:
                stream = self.engine.generate(choice.request)
            except QueueFullError:
                await asyncio.sleep(0.05)  # the response has started: wait for room rather than fail it
                continue
            self._submitted.append(choice)
            return stream

    async def _pump(self, choice: Choice, stream: AsyncIterator[RequestOutput] | None) -> None:
        try:
            if stream is None:
                stream = await self._admitted(choice)
            async for out in stream:
                self._queue.put_nowait((choice, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported to the consumer, which answers it in the error shape
            self._queue.put_nowait((choice, e))
        else:
            self._queue.put_nowait((choice, _DONE))
        finally:
            self._release(choice)

    def _release(self, choice: Choice) -> None:
        """Give the choice's place in the gate back (once): the client's next sequence may enter."""
        if self.gate is not None and choice.index not in self._released:
            self._released.add(choice.index)
            self.gate.leave(self.client, choice.index in self._entered)

    async def close(self) -> None:
        """Stop consuming and abort every engine request that has not finished (idempotent)."""
        for t in self._pumps:
            t.cancel()  # stopping the iteration aborts the engine request too
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for c in self._submitted:
            if not c.finished:
                await self.engine.abort(c.request.request_id)
        for c in self.choices:  # those never pumped (submission refused)
            self._release(c)

    # --- outputs -------------------------------------------------------------------------------------
    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each engine output as it comes, with its choice (already updated); ends when all are done."""
        if self._direct is not None:
            async for item in self._direct_outputs():
                yield item
            return
        ended = 0
        while ended < len(self._pumps):
            choice, item = await self._queue.get()
            if item is _DONE:
                ended += 1
                if not choice.finished:
                    raise APIError(500, "The engine ended a request without finishing it.", type="server_error",
                                   code="engine_error")
                continue
            if isinstance(item, EngineError):
                raise from_engine_error(item)
            if isinstance(item, Exception):
                raise APIError(500, f"Generation failed: {item}", type="server_error", code="engine_error")
            self._account(choice, item)
            yield choice, item
        self.metrics.observe_e2e(time.monotonic() - self.arrival)

    async def _direct_outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        choice = self.choices[0]
        try:
            async for out in self._direct:
                self._account(choice, out)
                yield choice, out
        except EngineError as e:
            raise from_engine_error(e) from e
        except APIError:
            raise
        except Exception as e:  # answered in the error shape, as the pumps' failures are
            raise APIError(500, f"Generation failed: {e}", type="server_error", code="engine_error") from e
        finally:
            self._release(choice)
        if not choice.finished:
            raise APIError(500, "The engine ended a request without finishing it.", type="server_error",
                           code="engine_error")
        self.metrics.observe_e2e(time.monotonic() - self.arrival)

    async def collect(self) -> list[Choice]:
        async for _ in self.outputs():
            pass
        return self.choices

    def _account(self, choice: Choice, out: RequestOutput) -> None:
        if out.error:
            if out.bad_request:  # the request's own structure has no way on, or costs the batch too much
                raise invalid_request(f"Generation stopped: {out.error}", code=out.error_code or "structure_dead_end")
            raise APIError(500, f"Generation failed: {out.error}", type="server_error", code="engine_error")
        if out.token_ids and not self._first_token_seen:
            self._first_token_seen = True
            self.metrics.observe_ttft(time.monotonic() - self.arrival)
        self.metrics.count_generation_tokens(len(out.token_ids))
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
            choice.pending_logprobs.extend(out.logprobs)
        choice.text.append(out.text)
        choice.completion_tokens = out.completion_tokens
        if out.finished:
            choice.finish_reason = out.finish_reason
            choice.stop_reason = out.stop_reason
            if out.finish_reason == "abort":  # not asked for by us: the server is stopping
                raise APIError(503, "The request was aborted by the server (shutting down?).",
                               type="server_error", code="request_aborted")

    def usage(self) -> Usage:
        completion = sum(c.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone away (the body has been read already, so nothing else arrives)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def collect_unless_disconnected(run: EngineRun, receive: Receive) -> list[Choice] | None:
    """The finished choices, or None if the client disconnected first (the run is then aborted)."""
    collecting = asyncio.create_task(run.collect())
    watching = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        return None
    finally:
        for t in (collecting, watching):
            t.cancel()
        await asyncio.gather(collecting, watching, return_exceptions=True)
        await run.close()
