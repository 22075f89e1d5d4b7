"""Pydantic models of the OpenAI-compatible API: requests, responses and stream chunks.

Only the HTTP edge uses these. Handlers turn a request into the engine's plain dataclasses
(``engine.contract``). Limits that do not depend on the running server are declared here;
those that do (``n``, number of stop strings, model length, known model names) are checked by the
handlers. Unknown top-level request fields are accepted and ignored, as vLLM does (logged once each at
debug level); fields that would change the output and are not implemented are refused. Our one extension
of the request is the ``adaptation`` object (and ``top_k``).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

FinishReason = Literal["stop", "length"]
# The engine keeps these numbers in int64 tensors and generators: larger ones are refused here, not there.
INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -2**63, 2**63 - 1


class _Request(BaseModel):
    # Strict: a value is taken only as the type the schema documents (no true for 1, no "2" for 2).
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_supported(name: str, value: Any, ok: Any) -> Any:
    if value not in ok:
        raise ValueError(f"{name} is not supported by this server")
    return value


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage of the request.")


log = logging.getLogger("t2serve.http")

# Fields of OpenAI's or vLLM's request schemas that change what is generated and that this server does not
# implement: refused with a 400 naming them, never ignored (the answer would not be what was asked for).
UNSUPPORTED = ("functions", "function_call", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs", "prompt_logprobs", "prediction", "audio")
_ignored_logged: set[str] = set()


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (order matters: `stream` before `stream_options`).

    Fields this schema does not know are accepted and ignored, as vLLM does (clients such as the openai SDK
    and LangChain send ``store``, ``metadata``, ``parallel_tool_calls``, ``service_tier`` ... by default);
    each such name is logged once at debug level. Known fields that would change the output and are not
    implemented (``UNSUPPORTED`` and the validators below) get a 400."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_fields(cls, data):
        if isinstance(data, dict):
            for name in data:
                if name not in cls.model_fields and name not in _ignored_logged:
                    _ignored_logged.add(name)
                    log.debug("request field %r is not used by this server: ignored", name)
        return data

    model: str | None = Field(None, description="Served model name; omitted = the server's model.")
    n: int = Field(1, ge=1, description="Choices to generate for each prompt.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX,
                       description="Extension: sample among the k most likely tokens; 0 or -1 = off.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX,
                             description="Same seed, prompt and parameters give the same tokens.")
    stop: str | list[str] | None = Field(None, description="Strings that end generation (not returned).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Minus this for each token already generated.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                     description="Minus this times each token's count in the generated text.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100], "
                                                "added to its logit.")
    repetition_penalty: float = Field(1.0, ge=0.01, le=2.0, description="vLLM's: logits of tokens in the prompt or "
                                      "output divided by it (positive ones) or multiplied (negative ones).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM's: drop tokens less likely than min_p times the "
                         "most likely one (sampling only).")
    min_tokens: int = Field(0, ge=0, le=INT32_MAX, description="vLLM's: no EOS or stop token before this many.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM's: token ids that end generation.")
    ignore_eos: bool = Field(False, description="vLLM's: keep generating past the end-of-sequence token.")
    include_stop_str_in_output: bool = Field(False, description="vLLM's: keep the stop string that ended the text.")
    skip_special_tokens: bool = Field(True, description="vLLM's: leave special tokens out of the text.")
    user: str | None = None
    # Known to OpenAI or vLLM, not implemented: refused unless null (declared, so the 400 names the field).
    functions: Any = Field(None, description="Not supported.")
    function_call: Any = Field(None, description="Not supported.")
    guided_json: Any = Field(None, description="Not supported.")
    guided_regex: Any = Field(None, description="Not supported.")
    guided_choice: Any = Field(None, description="Not supported.")
    guided_grammar: Any = Field(None, description="Not supported.")
    structured_outputs: Any = Field(None, description="Not supported.")
    prompt_logprobs: Any = Field(None, description="Not supported.")
    prediction: Any = Field(None, description="Not supported.")
    audio: Any = Field(None, description="Not supported.")
    adaptation: dict[str, Any] | None = Field(
        None, description="Extension: how to adapt the base model for this request (experts, strategy).")

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        return _not_supported(info.field_name, v, (None,))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if not v:
            return None
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {b} for {k}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt = Field(description="A string, a list of strings (a batch), token ids, or a list of token id lists.")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most; omitted = the server default.")
    echo: bool = Field(False, description="Not supported; only false.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only equal to n (or omitted) is supported.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probability of each generated token and of "
                                 "this many most likely alternatives.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, v, handler):
        try:
            return handler(v)
        except ValueError:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of "
                             "token id lists") from None

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        return _not_supported("echo", v, (False,))

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        return _not_supported("suffix", v, (None,))

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: ValidationInfo):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients send back assistant messages as they received them (with refusal, annotations, ...):
    # fields we do not use are ignored here rather than rejected.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, v, handler):
        try:
            return handler(v)
        except ValueError:
            raise ValueError("must be a string or a list of text parts ({'type': 'text', 'text': ...}); "
                             "other content types are not supported") from None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many most likely "
                                     "alternatives at each position.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported; only empty.")
    tool_choice: Any = None
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        return _not_supported("tools", v or None, (None,))

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ---------------------------------------------------------------------------------------

def _omit_none(v: Any) -> bool:
    return v is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's: the stop string or stop token id that ended the choice (null: EOS, length, or not yet)
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Absent from stream chunks except the last one when stream_options.include_usage is set.
    usage: Usage | None = Field(None, exclude_if=_omit_none)
    # Our extension: what pass 1 decided (strategy, chosen, expert, weights, pass1_ms); a list for a batch of
    # prompts. In a stream it comes with the last chunk.
    adaptation: dict[str, Any] | list[dict[str, Any]] | None = Field(None, exclude_if=_omit_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's: the stop string or stop token id that ended the choice (null: EOS, length, or not yet)
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # Our extension: what pass 1 decided (strategy, chosen, expert, weights, pass1_ms); a list for a batch of
    # prompts. In a stream it comes with the last chunk.
    adaptation: dict[str, Any] | list[dict[str, Any]] | None = Field(None, exclude_if=_omit_none)


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's: the stop string or stop token id that ended the choice (null: EOS, length, or not yet)
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)
    # Our extension: what pass 1 decided (strategy, chosen, expert, weights, pass1_ms); a list for a batch of
    # prompts. In a stream it comes with the last chunk.
    adaptation: dict[str, Any] | list[dict[str, Any]] | None = Field(None, exclude_if=_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "t2serve"
    parent: str | None = None  # for experts: the base model they adapt
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (documented in the OpenAPI schema)."""

    error: ErrorDetail
