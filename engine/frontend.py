"""The one engine front end: admission, streams, hand-off and abort, written once for every engine.

An engine backend only submits a request, aborts one, and reports outputs (``deliver``, from any thread);
the front end decides whether a request may be queued (``check_admission``), keeps each request's stream,
and gets every output to its caller's event loop. An output crosses at most two hand-offs before the HTTP
writer reads it: into the stream's queue (directly when the backend runs on the caller's loop, else batched
by ``Handoff``, one wake-up of the loop per batch), and out of it to the consumer.

    front = FrontEnd(max_model_len, capacity, submit=..., cancel=...)
    stream = front.open(request)      # raises QueueFullError / PromptTooLongError at once
    front.deliver(output)             # the backend, from its thread or loop
    front.release()                   # the backend: one accepted request no longer counts against capacity
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

from engine.contract import (
    GenerationRequest,
    Handoff,
    RequestOutput,
    check_admission,
    stream_outputs,
)


class FrontEnd:
    def __init__(self, max_model_len: int, capacity: Callable[[], int], *, submit: Callable[[GenerationRequest], None],
                 cancel: Callable[[str], None], score_budget: int = 0):
        self.max_model_len = max_model_len
        self._capacity = capacity  # how many accepted requests may count at once (read at each admission)
        self._submit, self._cancel = submit, cancel
        self.score_budget = score_budget  # tokens a score request needs beyond its prompt
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._handoff = Handoff()
        self._lock = threading.Lock()
        self.pending = 0  # accepted requests that still count against capacity (the backend releases them)

    # --- callers ---------------------------------------------------------------------------------------
    def open(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Admit ``request``, hand it to the backend and return its stream of outputs (the last one
        ``finished``); raises at once when it cannot be queued (the backend says first whether it runs at
        all). Leaving the stream early aborts it."""
        with self._lock:
            check_admission(request, self.max_model_len, self.pending, self._capacity(),
                            score_budget=self.score_budget)
            self.pending += 1
        q: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        self._streams[rid] = (asyncio.get_running_loop(), q)
        try:
            self._submit(request)
        except BaseException:
            self._streams.pop(rid, None)
            self.release()
            raise
        return stream_outputs(q, lambda finished: self._left(rid, finished))

    def abort(self, request_id: str) -> None:
        """End a request early (its stream ends with finish reason "abort")."""
        self._cancel(request_id)

    def _left(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:  # the consumer left early: the request is to be aborted
            self._cancel(request_id)

    # --- the backend -------------------------------------------------------------------------------------
    def deliver(self, out: RequestOutput) -> None:
        """Get ``out`` to its stream (from any thread). A finished stream is dropped here: its consumer may
        never have started iterating."""
        target = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if target is None:
            return
        loop, q = target
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:  # the backend runs on the caller's loop: straight into the queue
            q.put_nowait(out)
        else:
            self._handoff.put(loop, q, out)

    def release(self, n: int = 1) -> None:
        """``n`` accepted requests no longer count against capacity."""
        with self._lock:
            self.pending -= n

    @property
    def streams(self) -> int:
        return len(self._streams)
