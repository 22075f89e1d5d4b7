"""Admission in front of vLLM for adaptations served by swapping weights.

vLLM holds one set of weights. A request whose adaptation is served by swapped weights (``key``: that
adaptation's content key; None = the base weights) may only run while exactly those weights are
loaded, so requests are grouped by key:
- a request of the loaded key is admitted at once, unless another key has been waiting for longer than
  ``quantum`` seconds: then the loaded group stops growing, drains (its requests finish), and the
  weights are swapped to the key of the oldest waiting request, whose whole group is then admitted;
- a swap starts only when no admitted request is left, so no request ever runs on a half-swapped or
  foreign model; ``load(key, weights)`` does the swap (weights in place, prefix cache reset);
- if a swap fails, the base weights are loaded back and the requests of that key fail with the error;
  if even that fails, the gate is dead and every request fails.

Requests carrying LoRA adapters over the base weights share key None with the base model, so in a
server without swapped adaptations nothing ever waits here. The gate lives on one asyncio loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from engine.contract import EngineDeadError, EngineError

log = logging.getLogger("t2serve.vllm")


class SwapError(EngineError):
    """The weights of an adaptation could not be loaded."""


@dataclass(eq=False)
class _Waiter:
    key: str | None
    weights: Any
    since: float
    fut: asyncio.Future = field(repr=False)


class WeightGate:
    def __init__(self, load: Callable[[str | None, Any], Awaitable[None]], quantum: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._load, self.quantum, self._clock = load, quantum, clock
        self.current: str | None = None  # key of the loaded weights (None: base)
        self.active = 0  # admitted requests not yet finished
        self.swaps = 0
        self.swap_seconds = 0.0
        self.dead: BaseException | None = None
        self._waiting: list[_Waiter] = []  # arrival order
        self._swapping = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def admitted(self, key: str | None, weights: Any = None) -> AsyncIterator[None]:
        """Hold the loaded weights at ``key`` for the body (``weights``: what ``load`` needs for it)."""
        await self._enter(key, weights)
        try:
            yield
        finally:
            self._leave()

    # --- internals ---------------------------------------------------------------------------------
    async def _enter(self, key: str | None, weights: Any) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine's weights are in an unknown state: {self.dead}")
        if key == self.current and not self._swapping and self._open():
            self.active += 1
            return
        w = _Waiter(key, weights, self._clock(), asyncio.get_running_loop().create_future())
        self._waiting.append(w)
        self._kick()
        try:
            await w.fut
        except asyncio.CancelledError:
            if w in self._waiting:
                self._waiting.remove(w)
            elif w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self._leave()  # admitted just as its caller went away
            raise

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._kick()

    def _open(self) -> bool:
        """Whether the loaded group may still grow: no other key has waited ``quantum`` seconds yet."""
        others = [w.since for w in self._waiting if w.key != self.current]
        return not others or self._clock() - min(others) < self.quantum

    def _admit(self, key: str | None) -> None:
        for w in [w for w in self._waiting if w.key == key]:
            self._waiting.remove(w)
            if not w.fut.done():
                self.active += 1
                w.fut.set_result(None)

    def _kick(self) -> None:
        if self._swapping or self.dead is not None or not self._waiting:
            return
        if self._open():
            self._admit(self.current)
        if self.active > 0 or not self._waiting:
            return  # drain first; a swap never overlaps admitted requests
        nxt = self._waiting[0]  # the oldest waiter decides the next weights
        if nxt.key == self.current:
            self._admit(self.current)
            return
        self._swapping = True
        asyncio.get_running_loop().create_task(self._swap(nxt.key, nxt.weights))

    async def _swap(self, key: str | None, weights: Any) -> None:
        t0 = self._clock()
        try:
            await self._load(key, weights)
            self.current = key
            self.swaps += 1
        except Exception as e:
            log.exception("loading the weights of %s failed; going back to the base weights", key)
            self._fail(key, SwapError(f"the adapted weights could not be loaded: {e}"))
            try:
                await self._load(None, None)
                self.current = None
            except Exception as e2:
                log.exception("restoring the base weights failed; the engine stops serving")
                self.dead = e2
                self._fail(..., EngineDeadError(f"the engine's weights are in an unknown state: {e2}"))
        finally:
            self.swap_seconds += self._clock() - t0
            self._swapping = False
        if self.dead is None:
            self._admit(self.current)
            self._kick()

    def _fail(self, key, err: Exception) -> None:
        """Fail the waiters of ``key`` (``...``: all of them)."""
        for w in [w for w in self._waiting if key is ... or w.key == key]:
            self._waiting.remove(w)
            if not w.fut.done():
                w.fut.set_exception(err)
