"""One LoRA adapter folder per distinct mixture, kept in an LRU with a bound.

vLLM reads an adapter from its folder when it first schedules a request with it (and again after it
dropped it from its own cache), so a folder must exist as long as any request may use it: entries hold
a count of the requests using them and are only evicted at zero. Each entry gets an adapter id never
used before, so vLLM never serves stale weights under a reused id. The cache is driven from one asyncio
loop (the engine's); building a folder runs in a worker thread, and concurrent requests for an entry
being built wait for that one build.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

log = logging.getLogger("t2serve.vllm")


@dataclass(eq=False)
class Adapter:
    key: str  # content key of what the adapter serves
    lora_id: int  # vLLM's lora_int_id: unique for the life of the process
    path: Path
    info: Any = None  # what the build returned (e.g. the per-matrix report)
    refs: int = 0  # requests using it now
    name: str = field(init=False)

    def __post_init__(self):
        self.name = f"t2-{self.lora_id}"


class AdapterCache:
    """``acquire(key, build)`` -> an Adapter whose folder exists until ``release``.

    ``build(path)`` writes the folder and returns its info (runs in a thread); ``on_load(adapter)`` is
    awaited once a folder is built (e.g. to register it with vLLM, which validates it);
    ``on_evict(adapter)`` is awaited before its folder is deleted. At most ``capacity`` entries are kept
    while unused; entries in use may exceed it for as long as they are used.
    """

    def __init__(self, root: Path, capacity: int,
                 on_load: Callable[[Adapter], Awaitable[None]] | None = None,
                 on_evict: Callable[[Adapter], Awaitable[None]] | None = None):
        if capacity < 1:
            raise ValueError("the adapter cache needs room for at least one adapter")
        self.root, self.capacity = Path(root), capacity
        self.on_load, self.on_evict = on_load, on_evict
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._building: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.builds = 0  # folders written so far
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Adapter | None:
        return self._entries.get(key)

    async def acquire(self, key: str, build: Callable[[Path], Any]) -> Adapter:
        while True:
            entry = self._entries.get(key)
            if entry is not None:  # checked and taken in one step: no eviction in between
                entry.refs += 1
                self._entries.move_to_end(key)
                await self._evict()
                return entry
            task = self._building.get(key)
            if task is None:  # a build of its own, so that a caller that goes away never cancels it
                task = asyncio.ensure_future(self._build(key, build))
                self._building[key] = task
                task.add_done_callback(lambda t, k=key: self._built(k, t))
            await asyncio.shield(task)  # raises what the build raised

    def _built(self, key: str, task: asyncio.Future) -> None:
        self._building.pop(key, None)
        if not task.cancelled():
            task.exception()  # marked as retrieved: its requesters have it

    async def _build(self, key: str, build: Callable[[Path], Any]) -> Adapter:
        lora_id = next(self._ids)
        entry = Adapter(key, lora_id, self.root / f"adapter-{lora_id}")
        try:
            entry.info = await asyncio.to_thread(build, entry.path)
            if self.on_load is not None:
                await self.on_load(entry)
        except BaseException:
            shutil.rmtree(entry.path, ignore_errors=True)
            raise
        self.builds += 1
        self._entries[key] = entry
        return entry

    async def release(self, entry: Adapter) -> None:
        entry.refs -= 1
        if entry.refs < 0:
            raise RuntimeError(f"adapter {entry.name} released more often than acquired")
        await self._evict()

    async def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            victim = next((e for e in self._entries.values() if e.refs == 0), None)
            if victim is None:
                return  # every entry is in use: over the bound until some are released
            del self._entries[victim.key]
            self.evictions += 1
            try:
                if self.on_evict is not None:
                    await self.on_evict(victim)
            except Exception:  # a failed unregistration only costs memory in vLLM's own cache
                log.exception("unregistering adapter %s failed", victim.name)
            finally:
                shutil.rmtree(victim.path, ignore_errors=True)

    async def clear(self) -> None:
        """Drop every unused entry (shutdown)."""
        capacity, self.capacity = self.capacity, 0
        try:
            await self._evict()
        finally:
            self.capacity = capacity
