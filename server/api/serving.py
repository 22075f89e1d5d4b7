"""The steps the generation routes (completions, chat) share: engine and model checks, limits that
depend on the settings, tokenization in the tokenizer pool, token budgets, adaptation, submission, and
the answer (SSE event stream, or one body unless the client has gone)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request, Response
from pydantic import BaseModel

from adapters.adaptation import Adaptation
from server.api.generation import Choice, EngineRun, build_choices, collect_unless_disconnected, new_request_id
from server.api.sse import DONE_EVENT, EventStreamResponse, sse_event
from server.api.state import ServerState, check_model, ready_engine, server_state
from server.config import Settings
from server.errors import APIError, invalid_request
from server.prompts import check_token_ids, resolve_max_tokens
from server.schemas import AdaptationReport, ErrorResponse, Usage

# Documented in the OpenAPI schema: every error answer has the OpenAI error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` put in place (a response's schema cannot hold ``$defs``)."""
    schema = model.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def generation_responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The generation routes' answers: one JSON body, or with `stream: true` Server-Sent Events whose
    data are ``chunk`` objects (or an error object) and finally `[DONE]` (an OpenAPI 3.1 event schema)."""
    event_data = {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_inlined(chunk), _inlined(ErrorResponse)]}}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": event_data}}
    return {200: {"content": {"text/event-stream": {"schema": event}}}, **ERROR_RESPONSES}


def check_limits(body: Any, settings: Settings) -> None:
    """Limits of the running server that the schema cannot know (before any tokenization work)."""
    if body.n > settings.max_n:
        raise invalid_request(f"'n' is {body.n}; this server allows at most {settings.max_n}.", param="n")
    stops = body.stop_list()
    if len(stops) > settings.max_stop:
        raise invalid_request(f"{len(stops)} stop strings given; this server allows at most {settings.max_stop}.",
                              param="stop")


def check_capacity(prompts: int, n: int, settings: Settings, client_most: int) -> None:
    """A request with more sequences than one request may make, or than one client may ever hold
    (``client_most``), is refused for good (400), not told to retry later (429) as one that only meets a
    busy server is."""
    most = min(settings.max_request_seqs, client_most)
    if prompts * n > most:
        raise invalid_request(f"This request makes {prompts * n} sequences ({prompts} prompt(s) x n={n}); this "
                              f"server allows at most {most} per request.", param="n" if prompts == 1 else "prompt")


@dataclass
class StartedRun:
    model: str  # served model name, as answered
    request_id: str  # the response's `id`
    created: int  # the response's `created` (Unix seconds)
    run: EngineRun
    adaptation: AdaptationReport | list[AdaptationReport] | None = None  # pass 1's decision, for the response


async def decide_adaptations(state: ServerState, body: Any, prompts: list[list[int]],
                             texts: list[str | None]) -> tuple[list[Adaptation | None],
                                                               AdaptationReport | list[AdaptationReport]]:
    """Pass 1 for every prompt (concurrently: each is an engine score request): adaptations and the
    response's `adaptation` report (one object, or a list for a batch of prompts)."""
    spec = body.adaptation.model_dump(exclude_none=True) if body.adaptation is not None else None  # typed at the edge
    decisions = await asyncio.gather(*(state.resolver.decide(spec, p, body.model, t)
                                       for p, t in zip(prompts, texts)))
    infos = [AdaptationReport(**d.info()) for d in decisions]
    for d in decisions:
        # A mixture counts once for each expert in it: a label per combination of names would let clients
        # grow the series without bound (names may repeat, in any order).
        for expert in dict.fromkeys(d.chosen) if d.strategy == "explicit" else (d.expert,):
            state.metrics.count_adaptation(d.strategy, expert)
    return [d.adaptation for d in decisions], infos[0] if len(infos) == 1 else infos


def check_token_fields(body: Any, vocab: int, eos_ids: list[int]) -> None:
    """Token ids named by ``logit_bias`` and ``stop_token_ids`` must be in the vocabulary, and before
    ``min_tokens`` some token must be left that does not end the text (400 naming the field)."""
    for param, ids in (("logit_bias", [int(k) for k in (body.logit_bias or {})]),
                       ("stop_token_ids", list(body.stop_token_ids or []))):
        check_token_ids(ids, vocab, param)
    ends = set(body.stop_token_ids or []) | (set() if body.ignore_eos else set(eos_ids))
    if body.min_tokens and len(ends) >= vocab:
        raise invalid_request("'stop_token_ids' (with the end-of-sequence tokens) name every token of the "
                              "vocabulary, so none is left to generate before 'min_tokens'.", param="stop_token_ids")


async def check_structure(engine: Any, body: Any, settings: Any) -> None:
    """A structured output's schema, pattern or grammar must compile (400 naming the field) within the
    settings' limits (size first, then the compile's time, in the grammar engine's own pool); cached for the
    engine."""
    structure = body.structure()
    if structure is None:
        return
    from engine.structured import StructureError, StructureLimits

    grammars = getattr(engine, "grammars", None)
    if grammars is None:
        raise invalid_request("structured outputs are not available on this engine", param=body.structure_param())
    try:
        await grammars.check_async(structure, StructureLimits(settings.max_structure_chars,
                                                              settings.max_structure_choices,
                                                              settings.grammar_compile_seconds))
    except StructureError as e:
        raise invalid_request(f"{body.structure_param()}: {e}", param=body.structure_param()) from None


async def start_run(request: Request, body: Any, tokenize: Callable[[Any, int], list[list[int]]],
                    requested: int | None, *, id_prefix: str, prompt_param: str, max_param: str,
                    texts: list[str | None] | None = None) -> StartedRun:
    """Check, tokenize (``tokenize(tokenizer, most characters per prompt)`` -> one id list per prompt), run
    pass 1 and submit every choice. ``texts``: what pass 1 classifies for each prompt (None: the decoded
    prompt)."""
    arrival = time.monotonic()  # latency metrics include the tokenization
    state = server_state(request)
    settings = state.settings
    engine = ready_engine(request)
    model = check_model(engine, body.model, state.registry)
    check_limits(body, settings)
    check_token_fields(body, len(engine.tokenizer), list(getattr(engine, "eos_token_ids", None) or []))
    await check_structure(engine, body, settings)
    prompts = await state.tokenizing(tokenize, engine.tokenizer, await state.input_char_limit(engine))
    check_capacity(len(prompts), body.n, settings, state.gate.most)
    budgets = [resolve_max_tokens(len(p), requested, settings.default_max_tokens, engine.max_model_len,
                                  prompt_param=prompt_param, param=max_param) for p in prompts]
    adaptations, report = await decide_adaptations(state, body, prompts, texts or [None] * len(prompts))
    request_id = new_request_id(id_prefix)
    choices = build_choices(request_id, body, prompts, budgets, adaptations)
    run = EngineRun(engine, state.metrics, choices, prompt_tokens=sum(len(p) for p in prompts), arrival=arrival,
                    gate=state.gate, client=request.client.host if request.client else "")
    await run.submit()
    return StartedRun(model, request_id, int(time.time()), run, report)


async def answer(request: Request, started: StartedRun, stream: bool, events: Callable[[], AsyncIterator[str]],
                 body: Callable[[list[Choice]], BaseModel]) -> Response | BaseModel:
    """The SSE stream, or the whole body once every choice is done (499 if the client left first)."""
    if stream:
        return EventStreamResponse(events(), started.run.close)
    choices = await collect_unless_disconnected(started.run, request.receive)
    if choices is None:
        return Response(status_code=499)  # nobody reads it: the client has gone
    return body(choices)


async def stream_events(run: EngineRun, opening: list[BaseModel],
                        delta_chunk: Callable[[Choice, str, str | None], BaseModel],
                        usage_chunk: Callable[[Usage], BaseModel] | None,
                        adaptation: AdaptationReport | list[AdaptationReport] | None = None) -> AsyncIterator[str]:
    """SSE events of a run: the opening chunks, a ``delta_chunk(choice, new text, finish reason)`` per engine
    output worth sending (it takes the choice's log-probabilities not sent yet; None: nothing to send yet),
    the usage chunk when asked for, then ``[DONE]``. The chunk that
    finishes the last choice (and the usage chunk) carries pass 1's ``adaptation`` report. A failure
    mid-stream becomes an error event (the status line has gone out already)."""
    try:
        for chunk in opening:
            yield sse_event(chunk)
        async for choice, out in run.outputs():
            # Tokens whose text is held back (a partial character, a possible stop string) send nothing.
            if out.text or out.finished:
                chunk = delta_chunk(choice, out.text, out.finish_reason)
                if chunk is None:  # held back by the caller (tool calls are answered whole)
                    continue
                if out.finished and all(c.finished for c in run.choices):
                    chunk.adaptation = adaptation
                yield sse_event(chunk)
        if usage_chunk is not None:
            chunk = usage_chunk(run.usage())
            chunk.adaptation = adaptation
            yield sse_event(chunk)
    except APIError as e:
        yield sse_event(e.body())
    yield DONE_EVENT
