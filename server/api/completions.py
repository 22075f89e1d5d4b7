"""POST /v1/completions: text completion of a prompt, a batch of prompts, or token ids."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from engine.contract import EngineError, GenerationRequest, SamplingParams, ScoreSpec, TokenLogprob
from server.api.auth import require_api_key
from server.api.generation import Choice, new_request_id
from server.api.logprobs import completion_logprobs
from server.api.serving import answer, generation_responses, start_run, stream_events
from server.api.state import ready_engine
from server.errors import from_engine_error
from server.prompts import completion_prompt_ids
from server.schemas import CompletionChoice, CompletionRequest, CompletionResponse


def prompt_texts(prompt) -> list[str | None]:
    """What pass 1 classifies per prompt: the text itself (token-id prompts are decoded by the resolver)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return None


router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])


async def prompt_logprobs(engine, choices: list[Choice], n: int, k: int) -> dict[int, list[TokenLogprob]]:
    """Per prompt (index // n): its tokens' log-probabilities under the prompt's own adaptation, top ``k``
    alternatives each; the first token has none (logprob None)."""
    out: dict[int, list[TokenLogprob]] = {}
    for c in choices:
        p = c.index // n
        if p in out:
            continue
        req = GenerationRequest(new_request_id("echo"), c.request.prompt_ids, SamplingParams(max_tokens=1),
                                c.request.adaptation, score=ScoreSpec(prompt_logprobs=k))
        last = None
        try:
            async for o in engine.generate(req):
                last = o
        except EngineError as e:
            raise from_engine_error(e) from e
        if last is None or last.error or last.scores is None or last.scores.prompt_logprobs is None:
            raise from_engine_error(EngineError(last.error if last is not None and last.error
                                                else "no prompt log-probabilities came back"))
        first = TokenLogprob(c.request.prompt_ids[0], None, [])
        out[p] = [first] + last.scores.prompt_logprobs[1:]
    return out


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=generation_responses(CompletionResponse),
             summary="Complete a prompt (OpenAI Completions)")
async def create_completion(body: CompletionRequest, request: Request):
    started = await start_run(request, body, lambda tok, most: completion_prompt_ids(tok, body.prompt, most),
                              body.max_tokens,
                              id_prefix="cmpl", prompt_param="prompt", max_param="max_tokens",
                              texts=prompt_texts(body.prompt))

    def response(choices: list[CompletionChoice], **extra) -> CompletionResponse:
        return CompletionResponse(id=started.request_id, created=started.created, model=started.model,
                                  choices=choices, **extra)

    engine = ready_engine(request)
    tok = engine.tokenizer
    asked = body.logprob_count() is not None
    echoed: dict[int, str] = {}  # prompt index -> its text, put before each of its choices (echo)
    echo_lps: dict[int, list[TokenLogprob]] = {}
    if body.echo:
        texts = prompt_texts(body.prompt)
        for c in started.run.choices:
            p = c.index // body.n
            echoed[p] = texts[p] if texts else tok.decode(c.request.prompt_ids)
        if asked:
            try:
                echo_lps = await prompt_logprobs(engine, started.run.choices, body.n, body.logprob_count())
            except BaseException:
                await started.run.close()
                raise

    def events():
        def delta(choice: Choice, text: str, finish_reason: str | None) -> CompletionResponse:
            lps = None
            if asked:
                lps = completion_logprobs(tok, choice.take_logprobs(), choice.logprob_offset)
                choice.logprob_offset += sum(len(t) for t in lps.tokens)
            return response([CompletionChoice(index=choice.index, text=text, logprobs=lps, finish_reason=finish_reason,
                                              stop_reason=choice.stop_reason if finish_reason else None)])

        opening = []
        for c in started.run.choices if body.echo else []:  # the prompt first, as one chunk per choice
            p = c.index // body.n
            lps = completion_logprobs(tok, echo_lps[p]) if asked else None
            if asked:
                c.logprob_offset = sum(len(t) for t in lps.tokens)
            opening.append(response([CompletionChoice(index=c.index, text=echoed[p], logprobs=lps)]))
        usage_chunk = (lambda usage: response([], usage=usage)) if body.include_usage else None
        return stream_events(started.run, opening, delta, usage_chunk, started.adaptation)

    def whole(choices: list[Choice]) -> CompletionResponse:
        out = []
        for c in choices:
            p = c.index // body.n
            lps = completion_logprobs(tok, echo_lps.get(p, []) + c.logprobs) if asked else None
            out.append(CompletionChoice(index=c.index, text=echoed.get(p, "") + "".join(c.text),
                                        finish_reason=c.finish_reason, logprobs=lps, stop_reason=c.stop_reason))
        return response(out, usage=started.run.usage(), adaptation=started.adaptation)

    return await answer(request, started, body.stream, events, whole)
