"""Pydantic models of the OpenAI-compatible API: requests, responses and stream chunks.

Only the HTTP edge uses these. Handlers turn a request into the engine's plain dataclasses
(``engine.contract``). Limits that do not depend on the running server are declared here;
those that do (``n``, number of stop strings, model length, known model names) are checked by the
handlers. Unknown top-level request fields are accepted and ignored, as vLLM does (logged once each at
debug level); fields that would change the output and are not implemented are refused. Our one extension
of the request is the ``adaptation`` object (and ``top_k``).
"""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from engine.contract import Structure

FinishReason = Literal["stop", "length", "tool_calls"]
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
UNSUPPORTED = ("functions", "function_call", "prompt_logprobs", "prediction", "audio")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")  # vLLM's structured_outputs keys
_ignored_logged: set[str] = set()


Weight = Annotated[float, Field(ge=-10.0, le=10.0)]


class AdaptationSpec(_Request):
    """Our extension to a request: how to adapt the base model for it (pass 1 turns it into an ``Adaptation``).

    Give ``experts`` for an explicit mixture, ``task`` for a stored few-shot mixture, or ``strategy`` for pass 1;
    nothing keeps the server's default strategy. An expert can also be named in ``model``."""

    strategy: Literal["none", "prompt", "cls_expert", "sapt", "explicit", "few_shot"] | None = Field(
        None, description="none: the base weights; prompt: the model classifies the request; cls_expert: the "
        "classifier expert does; sapt: a SAPT bundle's attention over its tasks; explicit (with experts) and "
        "few_shot (with task) are implied by those fields.")
    experts: Annotated[dict[str, Weight], Field(max_length=16)] | Annotated[list[str], Field(max_length=16)] | None = Field(
        None, description="an SVF mixture {name: α} (α in [-10, 10], not normalised; at most 16), or names with "
        "`weights` (equal weights without); with strategy sapt, the one bundle to use")
    weights: Annotated[list[Weight], Field(max_length=16)] | None = Field(
        None, description="α per name of `experts` (a list)")
    task: str | None = Field(None, description="a task whose few-shot (CEM) mixture was stored by POST "
                             "/v1/adaptations", max_length=256)


class AdaptationReport(BaseModel):
    """What pass 1 decided for one prompt (``adaptation`` in a response)."""

    strategy: str = Field(description="the strategy that applied: none, expert, explicit, few_shot, prompt, "
                          "cls_expert or sapt")
    chosen: str | list[str] | None = Field(None, description="the category pass 1 chose, or the named experts")
    expert: str | None = Field(None, description="the expert or mixture applied; null: the base weights")
    weights: dict[str, float] = Field(default_factory=dict, description="category probabilities or mixture α")
    pass1_ms: float = Field(0.0, description="milliseconds pass 1 took")


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (order matters: `stream` before `stream_options`).

    Fields this schema does not know are accepted and ignored, as vLLM does (clients such as the openai SDK
    and LangChain send ``store``, ``metadata``, ``parallel_tool_calls``, ``service_tier`` ... by default);
    each such name is logged once at debug level. Known fields that would change the output and are not
    implemented (``UNSUPPORTED`` and the validators below) get a 400."""

    model_config = ConfigDict(extra="ignore", strict=True)
    _structure: tuple[str, Structure] | None = PrivateAttr(None)  # (field, structure), set by _one_structure

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
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
        "{'name': ..., 'schema': {...}, 'strict': true}}: the output parses as JSON (of that schema).")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: the output follows this JSON schema.")
    guided_regex: str | None = Field(None, description="vLLM's: the output matches this regular expression.")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the output is one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM's: the output follows this EBNF grammar (rule root).")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: one of json, regex, choice, grammar or json_object (true).")
    prompt_logprobs: Any = Field(None, description="Not supported.")
    prediction: Any = Field(None, description="Not supported.")
    audio: Any = Field(None, description="Not supported.")
    adaptation: AdaptationSpec | None = Field(
        None, description="Extension: how to adapt the base model for this request (experts, strategy).")

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        return _not_supported(info.field_name, v, (None,))

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format type must be text, json_object or json_schema")
        spec = v.get("json_schema")
        if kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
            raise ValueError("response_format json_schema needs json_schema.schema, a JSON object")
        return v

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, v):
        if not v:
            return v
        named = [k for k in STRUCTURED_KINDS if v.get(k) not in (None, False)]
        if len(named) != 1 or set(v) - set(STRUCTURED_KINDS) - {"disable_any_whitespace",
                                                                 "disable_additional_properties"}:
            raise ValueError(f"structured_outputs takes exactly one of {list(STRUCTURED_KINDS)}")
        k = named[0]
        if k == "choice" and not (isinstance(v[k], list) and all(isinstance(x, str) for x in v[k])):
            raise ValueError("structured_outputs.choice must be a list of strings")
        if k in ("regex", "grammar") and not isinstance(v[k], str):
            raise ValueError(f"structured_outputs.{k} must be a string")
        if k == "json" and not isinstance(v[k], (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (object or text)")
        return v

    @model_validator(mode="after")
    def _one_structure(self):
        found = self._named_structures()
        if len(found) > 1:
            raise ValueError(f"one structured-output field at a time, got {[n for n, _ in found]}")
        self._structure = found[0] if found else None  # read by structure() and structure_param()
        return self

    def _named_structures(self) -> list[tuple[str, Structure]]:
        """(field, the structure it names) of every field that names one (shapes checked by the validators)."""
        found: list[tuple[str, Structure]] = []
        rf = self.response_format
        if rf is not None and rf["type"] == "json_object":
            found.append(("response_format", Structure("json_object")))
        elif rf is not None and rf["type"] == "json_schema":
            found.append(("response_format", Structure("json", json.dumps(rf["json_schema"]["schema"]))))
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            found.append(("guided_json", Structure("json", schema)))
        if self.guided_regex is not None:
            found.append(("guided_regex", Structure("regex", self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", Structure("choice", tuple(self.guided_choice))))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", Structure("grammar", self.guided_grammar)))
        so = self.structured_outputs
        if so:
            k = next(k for k in STRUCTURED_KINDS if so.get(k) not in (None, False))
            v = so[k]
            if k == "json_object":
                found.append(("structured_outputs", Structure("json_object")))
            elif k == "json":
                found.append(("structured_outputs", Structure("json", v if isinstance(v, str) else json.dumps(v))))
            else:
                found.append(("structured_outputs", Structure(k, tuple(v) if k == "choice" else v)))
        return found

    def structure(self) -> Structure | None:
        """The structure the output must follow (structured outputs), from whichever field names one."""
        return self._structure[1] if self._structure else None

    def structure_param(self) -> str | None:
        """The field that named the structure (for error messages)."""
        return self._structure[0] if self._structure else None

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
            # ASCII digits: str.isdigit() also takes "²" and other digits int() refuses; a bounded length,
            # as int() refuses strings of more than 4,300 digits
            if not (k.isascii() and k.isdigit() and len(k) <= 18):
                raise ValueError(f"logit_bias keys are token ids as strings, got {k[:20]!r}")
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
    echo: bool = Field(False, description="Put the prompt before the completion; with logprobs, the prompt's "
                       "tokens' log-probabilities too (null at the first token).")
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


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}}


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    """The function of a call in an earlier assistant turn: ``arguments`` as OpenAI sends them (a string
    holding a JSON object), or the object itself; kept parsed."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str | dict[str, Any] = "{}"

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, v):
        if not isinstance(v, str):
            return v
        if not v.strip():
            return {}
        try:
            parsed = json.loads(v)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object as a string, e.g. '{\"city\": \"Paris\"}'")
        return parsed


class CalledTool(BaseModel):
    """A call in an earlier assistant turn, as the server answered it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    # Clients send back assistant messages as they received them (with refusal, annotations, ...):
    # fields we do not use are ignored here rather than rejected.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[CalledTool] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

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
    tools: list[ToolSpec] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required (some call), or one named function; "
        "required and named calls are enforced by the grammar engine, so they always parse.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; one call per answer when enforced.")

    @model_validator(mode="after")
    def _tool_choice(self):
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice required needs tools")
        return self

    def tool_mode(self) -> str | None:
        """None (no tools in play), auto, required, or the name of the function that must be called."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def _named_structures(self) -> list[tuple[str, Structure]]:
        """As the base class, plus the call a required or named tool_choice enforces (one JSON object
        {"name", "arguments"} of the allowed functions' schemas)."""
        found = super()._named_structures()
        mode = self.tool_mode()
        if mode not in ("required", "named"):
            return found
        allowed = [t.function for t in self.tools
                   if mode == "required" or t.function.name == self.tool_choice.function.name]
        if not allowed:  # a named function missing from tools: _tool_choice answers it
            return found
        calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters_schema()},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in allowed]
        return found + [("tools", Structure("json", json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})))]

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
    token_logprobs: list[float | None]  # None: the first prompt token of an echo (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]
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
    adaptation: AdaptationReport | list[AdaptationReport] | None = Field(None, exclude_if=_omit_none)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_omit_none)


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
    adaptation: AdaptationReport | list[AdaptationReport] | None = Field(None, exclude_if=_omit_none)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_omit_none)
    arguments: str | None = Field(None, exclude_if=_omit_none)


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = Field(None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(None, exclude_if=_omit_none)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_omit_none)


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
    adaptation: AdaptationReport | list[AdaptationReport] | None = Field(None, exclude_if=_omit_none)


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
