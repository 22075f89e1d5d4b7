"""The HTTP server's connections: uvicorn on h11, with a guard against clients that hold connections
without sending requests.

uvicorn closes a kept-alive connection that stays silent (``timeout_keep_alive``), but not a new connection
that sends nothing, nor a request head that arrives slowly or never: each holds a file descriptor, and a
few thousand reach the process's open-file limit, after which no connection (not even /health) is accepted.
Its ``limit_concurrency`` does not help: it answers 503 once a request head has arrived, so connections
that never finish their head still count, and everyone else gets 503. The guard, per connection:

- its request head must arrive whole within ``header_timeout`` seconds of the connection opening (on a
  kept-alive connection, of the next request's first byte), or the connection is closed;
- at most ``max_connections`` are open: one more closes the connection that has waited longest without a
  request in progress (a head not yet whole, or idle between requests); if every connection is busy with
  a request, the new one is closed. A client that sends its head at once is therefore always served.

The event loop accepts up to ``backlog`` connections at once before any of them is seen here, so the
backlog is kept small enough that the cap plus one such batch stays under the open-file limit: a burst of
connections then never makes ``accept`` fail (which would stop accepting for a second).

``uvicorn_config`` builds the server's configuration with this protocol (``t2serve serve`` and the tests'
live servers use it).
"""
from __future__ import annotations

import asyncio
import functools
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import Settings

FD_RESERVE = 128  # descriptors kept for the model's files, the expert store, logs and jobs


def connection_limits(max_connections: int | None) -> tuple[int, int]:
    """(most open connections, accept backlog) under the process's open-file limit: the backlog is a
    quarter of the descriptors left after the reserve (16 to 2048, uvicorn's default), the connections
    what remains (unless given)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    usable = max(64, soft - FD_RESERVE)
    backlog = min(2048, max(16, usable // 4))
    return max_connections or max(16, usable - backlog), backlog


class ConnectionGuard:
    """What the connections of one server share: the limits, the open connections, and those without a
    request in progress (evictable), oldest first."""

    def __init__(self, header_timeout: float, max_connections: int):
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.open: set[GuardedH11Protocol] = set()
        self.idle: dict[GuardedH11Protocol, None] = {}  # insertion order: the longest waiting first
        self.evicted = self.timed_out = self.refused = 0  # counts, for logs and tests

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Room for the new ``conn``: at the cap, the longest idle connection is closed; False when every
        open connection is busy with a request."""
        if len(self.open) >= self.max_connections:
            if not self.idle:
                self.refused += 1
                return False
            self.evicted += 1
            self.forget(next(iter(self.idle))).close()
        self.open.add(conn)
        return True

    def forget(self, conn: GuardedH11Protocol) -> GuardedH11Protocol:
        self.open.discard(conn)
        self.idle.pop(conn, None)
        return conn


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and the connection cap of ``guard``."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.abort()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self.cycle is not None and self.cycle.response_complete:
            self._await_head()  # the first bytes of the next request on a kept-alive connection
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request head arrived whole: a request is in progress
            self._stop_head_timer()
            self.guard.idle.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle until the next request (uvicorn's keep-alive timeout closes a silent one), unless a pipelined
        # request has started meanwhile.
        if self in self.guard.open and self.cycle.response_complete and not self.transport.is_closing():
            self.guard.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    def close(self) -> None:
        self._stop_head_timer()
        self.transport.close()  # nothing is in flight: a head not yet whole, or a response already written

    def _await_head(self) -> None:
        self.guard.idle.pop(self, None)
        self.guard.idle[self] = None  # the newest: evicted last
        self.head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        self.guard.timed_out += 1
        self.guard.forget(self).close()


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` with the connection guard of ``settings`` (``kwargs``: other
    uvicorn settings)."""
    most, backlog = connection_limits(settings.max_connections)
    guard = ConnectionGuard(settings.header_timeout, most)
    return uvicorn.Config(app, http=functools.partial(GuardedH11Protocol, guard=guard), backlog=backlog, **kwargs)
