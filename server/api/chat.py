"""POST /v1/chat/completions: the conversation goes through the model's chat template."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.generation import Choice
from server.api.logprobs import chat_logprobs
from server.api.serving import answer, generation_responses, start_run, stream_events
from server.api.state import ready_engine
from server.prompts import chat_prompt_ids
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
)

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])


def template_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=generation_responses(ChatCompletionChunk),
             summary="Answer a conversation (OpenAI Chat Completions)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    messages = template_messages(body)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # Pass 1 classifies the latest user turn (the request), not the whole templated conversation.
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    started = await start_run(request, body, lambda tok: [chat_prompt_ids(tok, messages)], body.max_new_tokens(),
                              id_prefix="chatcmpl", prompt_param="messages", max_param=max_param,
                              texts=[last_user])

    def chunk(choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=started.request_id, created=started.created, model=started.model,
                                   choices=choices, **extra)

    tok = ready_engine(request).tokenizer
    asked = body.logprob_count() is not None

    def events():
        def delta(choice: Choice, text: str, finish_reason: str | None) -> ChatCompletionChunk:
            lps = chat_logprobs(tok, choice.take_logprobs()) if asked else None
            return chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=text or None), logprobs=lps,
                                          finish_reason=finish_reason,
                                          stop_reason=choice.stop_reason if finish_reason else None)])

        # As OpenAI does: each choice opens with the role and empty content.
        opening = [chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
                   for c in started.run.choices]
        usage_chunk = (lambda usage: chunk([], usage=usage)) if body.include_usage else None
        return stream_events(started.run, opening, delta, usage_chunk, started.adaptation)

    def whole(choices: list[Choice]) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=started.request_id, created=started.created, model=started.model, usage=started.run.usage(),
            adaptation=started.adaptation,
            choices=[ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                                logprobs=chat_logprobs(tok, c.logprobs) if asked else None,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in choices])

    return await answer(request, started, body.stream, events, whole)
