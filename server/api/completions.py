"""POST /v1/completions: text completion of a prompt, a batch of prompts, or token ids."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.generation import Choice
from server.api.logprobs import completion_logprobs
from server.api.serving import answer, generation_responses, start_run, stream_events
from server.api.state import ready_engine
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


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=generation_responses(CompletionResponse),
             summary="Complete a prompt (OpenAI Completions)")
async def create_completion(body: CompletionRequest, request: Request):
    started = await start_run(request, body, lambda tok: completion_prompt_ids(tok, body.prompt), body.max_tokens,
                              id_prefix="cmpl", prompt_param="prompt", max_param="max_tokens",
                              texts=prompt_texts(body.prompt))

    def response(choices: list[CompletionChoice], **extra) -> CompletionResponse:
        return CompletionResponse(id=started.request_id, created=started.created, model=started.model,
                                  choices=choices, **extra)

    tok = ready_engine(request).tokenizer
    asked = body.logprob_count() is not None

    def events():
        def delta(choice: Choice, text: str, finish_reason: str | None) -> CompletionResponse:
            lps = None
            if asked:
                lps = completion_logprobs(tok, choice.take_logprobs(), choice.logprob_offset)
                choice.logprob_offset += sum(len(t) for t in lps.tokens)
            return response([CompletionChoice(index=choice.index, text=text, logprobs=lps, finish_reason=finish_reason,
                                              stop_reason=choice.stop_reason if finish_reason else None)])

        usage_chunk = (lambda usage: response([], usage=usage)) if body.include_usage else None
        return stream_events(started.run, [], delta, usage_chunk, started.adaptation)

    def whole(choices: list[Choice]) -> CompletionResponse:
        return response([CompletionChoice(index=c.index, text="".join(c.text), finish_reason=c.finish_reason,
                                          logprobs=completion_logprobs(tok, c.logprobs) if asked else None,
                                          stop_reason=c.stop_reason)
                         for c in choices], usage=started.run.usage(), adaptation=started.adaptation)

    return await answer(request, started, body.stream, events, whole)
