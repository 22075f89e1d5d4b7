"""Server-Sent Events in the OpenAI style (``data: {json}`` events, then ``data: [DONE]``), with
guaranteed clean-up: however the stream ends (finished, client gone, server stopping), ``on_close``
runs, which aborts the engine requests still going.

Starlette's ``StreamingResponse`` notices a disconnect only on ASGI servers that report it, and
leaves the body iterator to the garbage collector otherwise; here a watcher task listens for
``http.disconnect`` in every case and the iterator is always closed before ``on_close``.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.generation import wait_for_disconnect

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        # no-cache / no buffering: proxies must pass each event on as it comes.
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.create_task(self.stream_response(send))
        watching = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and not sending.cancelled():
                exc = sending.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                    raise exc
        finally:
            for t in (sending, watching):
                t.cancel()
            await asyncio.gather(sending, watching, return_exceptions=True)
            await self._events.aclose()
            await self._on_close()
