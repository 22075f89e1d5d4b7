"""Token log-probabilities (``engine.contract.TokenLogprob``) in the OpenAI shapes: completions' parallel
lists with text offsets, chat's list of tokens with their bytes and top alternatives."""
from __future__ import annotations

from engine.contract import TokenLogprob
from server.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """``offset``: the text offset of the first entry (a stream's later chunks continue where the last ended)."""
    tokens = [_text(tokenizer, e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[None if e.logprob is None else {_text(tokenizer, t): v for t, v in e.top}
                                            for e in entries],
                              text_offset=offsets)


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    def top(t: int, v: float) -> TopLogprob:
        s = _text(tokenizer, t)
        return TopLogprob(token=s, logprob=v, bytes=list(s.encode("utf-8")))

    content = []
    for e in entries:
        s = _text(tokenizer, e.token_id)
        content.append(ChatTokenLogprob(token=s, logprob=e.logprob, bytes=list(s.encode("utf-8")),
                                        top_logprobs=[top(t, v) for t, v in e.top]))
    return ChatLogprobs(content=content)
