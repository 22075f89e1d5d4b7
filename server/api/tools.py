"""Tool calling for chat completions: the tools put into the prompt, the model's calls parsed into OpenAI's
shape.

A chat template that knows tools (it reads ``tools``) gets them as they are. Otherwise the tools and the
call format are described in the system turn: a call is ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``, the format the Hermes and Qwen templates use. With ``tool_choice`` required or a named
function, the grammar engine makes the whole answer one such JSON object (``ChatCompletionRequest.structure``),
so the call always parses; with auto, calls are found in the text and the rest stays content. Earlier
assistant turns with ``tool_calls`` are written back in the same format, and tool turns keep their role.

Finding calls takes time linear in the text (``str.find`` for the tags, one JSON parse of each span): a
backtracking pattern over the model's text would let an answer of whitespace take seconds to parse.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from server.schemas import ChatCompletionRequest, FunctionCall, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def instructions(body: ChatCompletionRequest) -> str:
    specs = [{"name": t.function.name, "description": t.function.description or "",
              "parameters": t.function.parameters_schema()} for t in body.tools]
    return ("You can call these functions:\n" + "\n".join(json.dumps(s) for s in specs) +
            '\nTo call one, answer with <tool_call>{"name": <function name>, "arguments": <its arguments as a JSON '
            "object>}</tool_call> and nothing else.")


def render_messages(body: ChatCompletionRequest, tokenizer) -> tuple[list[dict], dict[str, Any]]:
    """(messages for the chat template, extra keyword arguments of apply_chat_template)."""
    messages = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.role == "assistant" and m.tool_calls:
            calls = [OPEN + json.dumps({"name": c.function.name, "arguments": c.function.arguments}) + CLOSE
                     for c in m.tool_calls]
            content = (content + "\n" if content else "") + "\n".join(calls)
        messages.append({"role": role, "content": content})
    if body.tool_mode() is None:
        return messages, {}
    if template_knows_tools(tokenizer):
        return messages, {"tools": [t.model_dump(exclude_none=True) for t in body.tools]}
    text = instructions(body)
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages, {}


def _json(text: str) -> Any:
    """``text`` parsed as JSON, or None where it is not JSON (or nests deeper than the parser goes)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _json(args)
    if not isinstance(args, dict):
        return None
    try:
        arguments = json.dumps(args)
    except (ValueError, RecursionError):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=obj["name"], arguments=arguments))


def tagged_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inside) of each ``<tool_call>...</tool_call>`` in ``text``, in order: each closing tag
    pairs with the last opening tag before it. One pass of ``str.find``/``rfind``: linear in the text."""
    spans, at = [], 0
    while (start := text.find(OPEN, at)) >= 0:
        close = text.find(CLOSE, start + len(OPEN))
        if close < 0:
            break
        start = text.rfind(OPEN, start, close)
        spans.append((start, close + len(CLOSE), text[start + len(OPEN):close]))
        at = close + len(CLOSE)
    return spans


def parse_calls(body: ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content left, the calls) of an answer; no calls: the whole text is content."""
    names = {t.function.name for t in body.tools or []}
    if body.tool_mode() in ("required", "named"):  # cut by max_tokens: no call, the text is what there is
        call = _call(_json(text), names)
        return (None, [call]) if call is not None else (text, [])
    calls, kept, at = [], [], 0
    for start, end, inside in tagged_spans(text):
        call = _call(_json(inside.strip()), names)
        if call is not None:
            calls.append(call)
            kept.append(text[at:start])
            at = end
    if not calls:
        return text, []
    kept.append(text[at:])
    return ("".join(kept).strip() or None), calls
