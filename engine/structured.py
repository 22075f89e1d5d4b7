"""Structured outputs through xgrammar, the grammar engine vLLM uses: a ``Structure`` compiled once per
tokenizer (cached), a matcher per sequence, and per step a token mask for the rows that carry one.

Both engines' edges call ``Grammars.check`` so a bad schema, pattern or grammar is a 400 before the request
reaches a batch; the native engine masks its own rows (``StepMasks``), vLLM gets the same ``Structure`` as
its ``StructuredOutputsParams``.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.contract import Structure


class StructureError(ValueError):
    """The structure cannot be compiled (bad JSON schema, pattern or grammar): the request's fault."""


@dataclass(frozen=True)
class StructureLimits:
    """What a request's structure may ask of the grammar engine, checked before and while it compiles."""

    max_chars: int = 100_000  # characters of a schema, pattern or grammar (all choices together)
    max_choices: int = 1_000  # strings of a choice
    compile_seconds: float = 10.0  # a compile that takes longer is refused (it runs on, in a bounded pool)


def check_size(st: Structure, limits: StructureLimits) -> None:
    """StructureError when ``st`` is larger than ``limits`` allow (no compiling: cheap, before anything else)."""
    if st.kind == "choice" and isinstance(st.value, tuple):
        if len(st.value) > limits.max_choices:
            raise StructureError(f"{len(st.value)} choices; at most {limits.max_choices} (setting "
                                 "max_structure_choices)")
        size = sum(len(c) for c in st.value if isinstance(c, str))
    else:
        size = len(st.value) if isinstance(st.value, str) else 0
    if size > limits.max_chars:
        raise StructureError(f"{st.kind} of {size} characters; at most {limits.max_chars} (setting "
                             "max_structure_chars)")


def choice_regex(choices: tuple[str, ...]) -> str:
    """A pattern matching exactly one of ``choices``."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class Grammars:
    """Compiled structures of one tokenizer (LRU, ``capacity`` kept) and the matchers built from them.

    ``shared`` gives one per (tokenizer, vocabulary size, stop ids) in a process: building the tokenizer's
    tables takes about a second for a 49k vocabulary, and engines rebuilt in one process (benchmarks, tests,
    an engine restart) reuse them with their compiled grammars."""

    _shared: dict[tuple, "Grammars"] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None) -> "Grammars":
        key = (id(tokenizer), vocab_size, tuple(stop_token_ids or ()))
        with cls._shared_lock:
            g = cls._shared.get(key)
            if g is None or g._tokenizer is not tokenizer:
                g = cls._shared[key] = cls(tokenizer, vocab_size, stop_token_ids)
            return g

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None, capacity: int = 256):
        import xgrammar as xgr

        self._xgr = xgr
        self._tokenizer = tokenizer  # kept: ``shared`` keys on its id
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._info = info
        self._plain: torch.Tensor | None = None  # bitmask of the tokens holding no control character
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[Structure, object] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        # Compiles requested from the event loop run here, not in the default pool: at most two at once, so
        # structures that take long (or never end: xgrammar cannot be interrupted) hold these threads only.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="t2-grammar")
        self._running: dict[Structure, asyncio.Future] = {}  # compiles in flight, shared by equal requests
        self._refused: OrderedDict[Structure, str] = OrderedDict()  # structures whose compile ran out of time

    def compile(self, st: Structure):
        with self._lock:
            hit = self._cache.get(st)
            if hit is not None:
                self._cache.move_to_end(st)
                return hit
        try:
            compiled = self._compile(st)
        except StructureError:
            raise
        except Exception as e:  # xgrammar's parse errors are RuntimeError/ValueError with its own message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StructureError(f"{st.kind}: {first}") from None
        with self._lock:
            self._cache[st] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, st: Structure):
        c = self._compiler
        if st.kind == "json":
            try:
                schema = json.loads(st.value)
            except (TypeError, json.JSONDecodeError) as e:
                raise StructureError(f"json schema is not JSON: {e}") from None
            if not isinstance(schema, dict):
                raise StructureError("a json schema must be a JSON object")
            return c.compile_json_schema(st.value, any_whitespace=False, strict_mode=True)
        if st.kind == "json_object":  # compact, as the schema kinds: no runaway whitespace
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if st.kind == "regex":
            if not isinstance(st.value, str) or not st.value:
                raise StructureError("regex must be a non-empty string")
            return c.compile_regex(st.value)
        if st.kind == "choice":
            if not st.value or not all(isinstance(x, str) and x for x in st.value):
                raise StructureError("choice must be a non-empty list of non-empty strings")
            compiled = c.compile_regex(choice_regex(tuple(st.value)))
            for j, text in enumerate(st.value):
                stuck = self._dead_end(compiled, text)
                if stuck is not None:
                    raise StructureError(f"choice {j} cannot be generated with this model's tokens: the grammar "
                                         f"engine allows no token after {stuck!r}")
            return compiled
        if st.kind == "grammar":
            if not isinstance(st.value, str) or not st.value.strip():
                raise StructureError("grammar must be a non-empty EBNF string")
            return c.compile_grammar(st.value)
        raise StructureError(f"unknown structure kind {st.kind!r}")

    def _dead_end(self, compiled, text: str) -> str | None:
        """Walk ``text``'s own tokens through a matcher of ``compiled``: the prefix after which it allows no token
        at all (a dead end: some characters, e.g. beyond the Basic Multilingual Plane, defeat the grammar
        engine), or None. A token of the walk the matcher refuses (a tokenizer that spells ``text`` another
        way) ends the walk without a verdict."""
        xgr = self._xgr
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        m = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        for n, t in enumerate([*ids, None]):
            if m.is_terminated():
                return None
            bitmask.zero_()
            m.fill_next_token_bitmask(bitmask, 0)
            if not bool(bitmask.any()):
                return self._tokenizer.decode(ids[:n])
            if t is None or not m.accept_token(t):
                return None
        return None

    def check(self, st: Structure) -> None:
        """Raise StructureError when ``st`` does not compile (cached, so the engine's own compile is free)."""
        self.compile(st)

    async def check_async(self, st: Structure, limits: StructureLimits = StructureLimits()) -> None:
        """``check`` from the event loop, within ``limits``: sizes first, then the compile in this object's
        own pool, refused (StructureError) when it takes longer than ``limits.compile_seconds``; a refused
        structure is refused at once when it comes again."""
        check_size(st, limits)
        with self._lock:
            if st in self._cache:
                return
            why = self._refused.get(st)
        if why is not None:
            raise StructureError(why)
        loop = asyncio.get_running_loop()
        fut = self._running.get(st)
        if fut is None or fut.get_loop() is not loop:
            fut = self._running[st] = loop.run_in_executor(self._pool, self.compile, st)
            fut.add_done_callback(lambda f, st=st: self._running.pop(st, None) if self._running.get(st) is f else None)
        try:
            await asyncio.wait_for(asyncio.shield(fut), limits.compile_seconds)
        except asyncio.TimeoutError:
            why = (f"{st.kind}: compiling it took longer than {limits.compile_seconds:g} s (setting "
                   "grammar_compile_seconds); simplify it")
            with self._lock:
                self._refused[st] = why
                while len(self._refused) > self.capacity:
                    self._refused.popitem(last=False)
            raise StructureError(why) from None

    def matcher(self, st: Structure):
        return self._xgr.GrammarMatcher(self.compile(st))

    def plain_tokens(self) -> torch.Tensor:
        """(words,) int32 bitmask in xgrammar's layout: the tokens whose text holds no control character
        (U+0000 to U+001F). Compact JSON holds none (strings must escape them), but the JSON grammars let
        raw tabs into strings, which strict parsers refuse: JSON rows are masked with this too."""
        if self._plain is None:
            V = self.vocab_size
            bits = torch.ones(-(-V // 32) * 32, dtype=torch.int64)
            bits[V:] = 0
            for i, b in enumerate(self._info.decoded_vocab[:V]):
                if any(c < 0x20 for c in b):
                    bits[i] = 0
            words = (bits.view(-1, 32) << torch.arange(32)).sum(1)
            self._plain = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return self._plain

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, object]], plain: list[int] = (),
             budget_s: float | None = None) -> list[tuple[int, float]]:
        """Set to -inf, in place, the logits of tokens each listed row's matcher does not allow next.
        rows: (row index in ``logits``, its matcher); plain: rows that also take no control character.
        Returns (row, seconds) of the rows whose matcher took longer than ``budget_s`` (an ambiguous grammar's
        cost grows with its text: the caller ends such rows rather than let the batch wait on them)."""
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        slow = []
        for i, m in rows:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, i)
            took = time.perf_counter() - t0
            if budget_s is not None and took > budget_s:
                slow.append((i, took))
        if plain:
            bitmask[list(plain)] &= self.plain_tokens()
        idx = [i for i, _ in rows]
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=idx)
        return slow
