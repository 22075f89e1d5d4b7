"""One request's state inside the engine, and its incremental detokenizer with stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from engine.contract import FinishReason, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Detokenizer:
    """Turns a growing list of token ids into text deltas, and ends the text at the first stop string.

    Decoding a short window of recent tokens (not the whole output each step) keeps the cost per token
    constant; a window that ends inside a multi-byte character (U+FFFD at its end) waits for the next token.
    """

    def __init__(self, tokenizer, stop: list[str], include_stop: bool = False, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop, self.skip_special = include_stop, skip_special_tokens
        self.stop_hit: str | None = None  # the stop string that ended the text
        self.text = ""  # all text decoded so far (cut at a stop string)
        self.emitted = 0  # chars of `text` already handed out
        self._prefix = 0  # token index where the decode window starts
        self._read = 0  # tokens whose text is already in `text`

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Account for ids[-1] (ids = all output ids); return (new text to emit, stop string hit)."""
        prev = self.tok.decode(ids[self._prefix : self._read], skip_special_tokens=self.skip_special)
        cur = self.tok.decode(ids[self._prefix :], skip_special_tokens=self.skip_special)
        if cur.endswith("\ufffd"):
            return "", False
        self.text += cur[len(prev) :]
        self._prefix, self._read = self._read, len(ids)
        if self.stop:
            # Only the tail can hold a new match: look back by the longest stop string.
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(p, s) for p, s in ((self.text.find(s, start), s) for s in self.stop) if p >= 0]
            if hits:
                at, self.stop_hit = min(hits, key=lambda h: h[0])
                self.text = self.text[: at + (len(self.stop_hit) if self.include_stop else 0)]
                return self._take(len(self.text)), True
            return self._take(len(self.text) - self._held_back()), False
        return self._take(len(self.text)), False

    def flush(self) -> str:
        """Text held back as a possible stop-string prefix, released when the sequence ends otherwise."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted : upto], upto
        return out


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adaptation: Any
    detok: Detokenizer
    generator: torch.Generator | None = None
    score: Any = None  # ScoreSpec: answered from the prefill, never decoded
    matcher: Any = None  # xgrammar GrammarMatcher of a structured output (engine.structured)
    mask_strikes: int = 0  # steps running whose grammar mask took longer than the engine's budget
    prefix_len: int = 0  # leading prompt tokens whose KV may come from the prefix cache
    priority: int = 0  # lower is admitted first (engine.contract.USER / BACKGROUND)
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)  # TokenLogprob per output token (when asked for)
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    slot: int = -1  # row of the KV cache while running
    num_cached: int = 0  # tokens whose K/V are in the cache
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    sent_tokens: int = 0  # output ids already reported to the client

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
