"""POST /tokenize, POST /detokenize and GET /version, in vLLM's shapes (clients and tools that count tokens
before sending, or read the server's version, work against either server). Both run in the tokenizer pool
(megabytes of text take seconds), with the prompts' character limit."""
from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api.auth import require_api_key
from server.api.chat import template_messages
from server.api.serving import ERROR_RESPONSES
from server.api.state import check_model, ready_engine, server_state
from server.errors import invalid_request
from server.prompts import chat_prompt_ids, check_chars, check_text, check_token_ids
from server.schemas import ChatMessage

router = APIRouter(tags=["tokens"])


class TokenizeRequest(BaseModel):
    """Either ``prompt`` (text, as /v1/completions encodes it) or ``messages`` (through the chat template,
    as /v1/chat/completions renders them)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="prompt only: the tokenizer's special tokens (BOS ...)")
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant's turn")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    engine = ready_engine(request)
    state = server_state(request)
    check_model(engine, body.model, state.registry)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("give either 'prompt' or 'messages'", param="prompt")
    most = await state.input_char_limit(engine)

    def work(tok) -> TokenizeResponse:
        if body.prompt is not None:
            ids = tok.encode(check_text(check_chars(body.prompt, most, "prompt"), "prompt"),
                             add_special_tokens=body.add_special_tokens)
        else:  # exactly what /v1/chat/completions generates after (with add_generation_prompt)
            ids = chat_prompt_ids(tok, template_messages(body), body.add_generation_prompt, max_chars=most)
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    return await state.tokenizing(work, engine.tokenizer)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine = ready_engine(request)
    state = server_state(request)
    check_model(engine, body.model, state.registry)

    def work(tok) -> DetokenizeResponse:
        check_token_ids(body.tokens, len(tok), "tokens")
        return DetokenizeResponse(prompt=tok.decode(body.tokens))

    return await state.tokenizing(work, engine.tokenizer)


@router.get("/version")
async def version() -> dict:
    try:
        v = importlib.metadata.version("t2serve")
    except importlib.metadata.PackageNotFoundError:
        v = "unknown"
    return {"version": v}
