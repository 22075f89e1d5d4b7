"""Request prompts to token ids, and the length checks that need the token count.

Completions take a string, a batch of strings, token ids or a batch of token id lists; chat requests
go through the tokenizer's chat template with the generation prompt appended. Every failure is an
``APIError`` 400 that names the field. (Named ``prompts`` rather than ``tokenize`` so that running a
file from this folder can never shadow the standard library's ``tokenize``.)
"""
from __future__ import annotations

from typing import Any

from server.errors import invalid_request


def check_text(text: str, param: str) -> str:
    """``text`` if UTF-8 can encode it; JSON escapes can smuggle in lone surrogates, which it cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid_request(f"'{param}' is not valid Unicode text: it holds a lone surrogate "
                              f"(\\u{ord(text[e.start]):04x}) at character {e.start}.", param=param) from None
    return text


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    """400 naming ``param`` when any of ``ids`` is outside the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise invalid_request(f"'{param}' holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}.",
                              param=param)


def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token string: no text longer than ``n`` times this fits in
    ``n`` tokens (a byte-level token's string has a character per byte, at least its text's characters)."""
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(s or "") for s in strings)


def check_chars(text: str, limit: int | None, param: str, what: str = "has") -> str:
    """``text`` if it has at most ``limit`` characters (None: any), else a 400 naming ``param``: checked
    before the text is tokenized, which takes seconds for megabytes."""
    if limit is not None and len(text) > limit:
        raise invalid_request(f"'{param}' {what} {len(text)} characters; this server takes at most {limit} per "
                              "prompt.", param=param, code="context_length_exceeded")
    return text


def completion_prompt_ids(tokenizer, prompt: str | list[Any], max_chars: int | None = None) -> list[list[int]]:
    """Token ids of every prompt in a completions request (one list per prompt); text prompts longer than
    ``max_chars`` are refused."""
    if isinstance(prompt, str):
        batch: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        batch = [prompt]  # a single prompt given as token ids
    else:
        batch = list(prompt)
    if not batch:
        raise invalid_request("'prompt' must not be empty.", param="prompt")
    vocab = len(tokenizer)
    out = []
    for i, p in enumerate(batch):
        where = "prompt" if len(batch) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            if not p:
                raise invalid_request(f"'{where}' must not be an empty string.", param=where)
            ids = tokenizer.encode(check_text(check_chars(p, max_chars, where), where))
        else:
            ids = list(p)
            if not ids:
                raise invalid_request(f"'{where}' must not be an empty list of token ids.", param=where)
            check_token_ids(ids, vocab, where)
        out.append(ids)
    return out


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    max_chars: int | None = None, **template_kw) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn
    (unless ``add_generation_prompt`` is False); ``template_kw`` go to the template (e.g. ``tools``). A
    rendered conversation longer than ``max_chars`` is refused."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_request("This model has no chat template; use /v1/completions instead.",
                              param="messages", code="chat_template_missing")
    for i, m in enumerate(messages):
        check_text(m["content"], f"messages.{i}.content")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **template_kw)
    except Exception as e:  # templates reject conversations with raise_exception(...)
        raise invalid_request(f"The chat template rejected these messages: {e}", param="messages") from e
    check_chars(text, max_chars, "messages", what="make a prompt of")
    # The template already wrote the special tokens (BOS, role markers): do not add them twice.
    return tokenizer.encode(text, add_special_tokens=False)


def resolve_max_tokens(prompt_len: int, requested: int | None, default: int, max_model_len: int, *,
                       prompt_param: str = "prompt", param: str = "max_tokens") -> int:
    """New-token budget of one prompt: the requested one if it fits, else a 400 with the numbers.

    Omitted, it is the server default cut to the room left in the model length.
    """
    room = max_model_len - prompt_len
    if room <= 0:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens. Please shorten the prompt.", param=prompt_param,
            code="context_length_exceeded")
    if requested is None:
        return min(default, room)
    if requested > room:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {param}.", param=param, code="context_length_exceeded")
    return requested
