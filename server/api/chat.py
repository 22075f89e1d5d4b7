"""POST /v1/chat/completions: the conversation goes through the model's chat template."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.generation import Choice
from server.api.logprobs import chat_logprobs
from server.api.serving import answer, generation_responses, start_run, stream_events
from server.api.state import ready_engine
from server.api.tools import parse_calls, render_messages
from server.prompts import chat_prompt_ids
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    FunctionCallDelta,
    ToolCallDelta,
)

router = APIRouter(tags=["generation"], dependencies=[Depends(require_api_key)])


def template_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def answer_message(body: ChatCompletionRequest, text: str, finish_reason: str | None):
    """(the assistant message, its finish reason): tool calls parsed out when tools are in play."""
    if body.tool_mode() is None:
        return AssistantMessage(content=text), finish_reason
    content, calls = parse_calls(body, text)
    return AssistantMessage(content=content, tool_calls=calls or None), ("tool_calls" if calls else finish_reason)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=generation_responses(ChatCompletionChunk),
             summary="Answer a conversation (OpenAI Chat Completions)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    messages = template_messages(body)
    tok = ready_engine(request).tokenizer
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # Pass 1 classifies the latest user turn (the request), not the whole templated conversation.
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)

    def prompt(tok, most: int) -> list[list[int]]:  # in the tokenizer pool, rendering included
        rendered, template_kw = render_messages(body, tok)
        return [chat_prompt_ids(tok, rendered, max_chars=most, **template_kw)]

    started = await start_run(request, body, prompt, body.max_new_tokens(),
                              id_prefix="chatcmpl", prompt_param="messages", max_param=max_param, texts=[last_user])

    def chunk(choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=started.request_id, created=started.created, model=started.model,
                                   choices=choices, **extra)

    asked = body.logprob_count() is not None
    held: dict[int, list[str]] = {}  # with tools in play: each choice's text, answered when it ends

    def events():
        def delta(choice: Choice, text: str, finish_reason: str | None) -> ChatCompletionChunk | None:
            if body.tool_mode() is not None:  # a call is known only once the answer is whole
                held.setdefault(choice.index, []).append(text)
                if finish_reason is None:
                    return None
                message, finish_reason = answer_message(body, "".join(held.pop(choice.index)), finish_reason)
                calls = [ToolCallDelta(index=k, id=c.id, type="function",
                                       function=FunctionCallDelta(name=c.function.name, arguments=c.function.arguments))
                         for k, c in enumerate(message.tool_calls or [])]
                d = ChatDelta(content=message.content or None, tool_calls=calls or None)
            else:
                d = ChatDelta(content=text or None)
            lps = chat_logprobs(tok, choice.take_logprobs()) if asked else None
            return chunk([ChatChunkChoice(index=choice.index, delta=d, logprobs=lps, finish_reason=finish_reason,
                                          stop_reason=choice.stop_reason if finish_reason else None)])

        # As OpenAI does: each choice opens with the role and empty content.
        opening = [chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
                   for c in started.run.choices]
        usage_chunk = (lambda usage: chunk([], usage=usage)) if body.include_usage else None
        return stream_events(started.run, opening, delta, usage_chunk, started.adaptation)

    def whole(choices: list[Choice]) -> ChatCompletionResponse:
        out = []
        for c in choices:
            message, finish_reason = answer_message(body, "".join(c.text), c.finish_reason)
            out.append(ChatChoice(index=c.index, message=message, finish_reason=finish_reason,
                                  logprobs=chat_logprobs(tok, c.logprobs) if asked else None, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=started.request_id, created=started.created, model=started.model,
                                      usage=started.run.usage(), adaptation=started.adaptation, choices=out)

    return await answer(request, started, body.stream, events, whole)
