"""Plain ASGI middleware: API keys checked from the headers before any body is read, the request body size
limit, read timeout and the bytes all unfinished bodies may hold together, and per-route request metrics.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one runs the app in a separate task
and breaks streaming responses' disconnect detection, which the generation routes rely on.
"""
from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import admin_key_error, api_key_error, bearer_token, key_for_route
from server.config import Settings
from server.errors import APIError
from server.metrics import Metrics


async def send_error(send: Send, err: APIError, close: bool = False, retry_after: int | None = None) -> None:
    """Answer ``err`` in the OpenAI error shape; ``close``: the body was not read, so the connection ends."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthGate:
    """Checks the API key of every request that carries a body from its ``Authorization`` header, before a
    byte of the body is read: an unauthenticated client cannot make the server buffer (or wait for) a body."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            need = key_for_route(scope["method"], scope.get("path", ""))
            if need is not None:
                token = bearer_token(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
                check = admin_key_error if need == "admin" else api_key_error
                err = check(self.settings, token)
                if err is not None:
                    await discard_small_body(scope, receive)
                    await send_error(send, err, close=True)
                    return
        await self.app(scope, receive, send)


DISCARD_BYTES, DISCARD_SECONDS = 64 * 1024, 1.0


async def discard_small_body(scope: Scope, receive: Receive) -> None:
    """Read and drop a small declared body before a refusal closes the connection: unread bytes left in the
    socket make the close a TCP reset, which can reach the client before the answer does. A large or
    undeclared body is not read (the refusal never waits for it), nor is one slower than a second."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is None or not declared.isdigit() or int(declared) > DISCARD_BYTES:
        return

    async def drain() -> None:
        while (await receive()).get("more_body", False):
            pass

    try:
        await asyncio.wait_for(drain(), DISCARD_SECONDS)
    except asyncio.TimeoutError:
        pass


class BodyLimitMiddleware:
    """Answers 413 to bodies over ``max_bytes`` (or the limit of the first ``route_limits`` path prefix
    that matches, e.g. expert uploads) before the app parses them, 408 to a body that has not arrived
    whole within ``read_timeout`` seconds, and 503 to a body that would take the bytes held by all bodies
    still arriving past ``max_pending`` (at least the largest body limit, so that every body can arrive).

    The body is read here (it would be read whole by the JSON parser anyway) and replayed to the app;
    after the replay, ``receive`` goes to the server again, so the app still sees ``http.disconnect``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, route_limits: dict[str, int] | None = None,
                 read_timeout: float = 30.0, max_pending: int | None = None):
        self.app, self.max_bytes, self.route_limits = app, max_bytes, dict(route_limits or {})
        self.read_timeout = read_timeout
        largest = max([max_bytes, *self.route_limits.values()])
        self.max_pending = max(largest, max_pending) if max_pending is not None else None
        self.pending = 0  # bytes held by bodies still arriving, all requests together

    def _limit(self, path: str) -> int:
        return next((n for prefix, n in self.route_limits.items() if path.startswith(prefix)), self.max_bytes)

    def _too_large(self, size: int | None, limit: int) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(413, f"The request body is too large{got}; the limit is {limit} bytes.",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, self._too_large(int(declared), limit))
            return
        chunks: list[bytes] = []
        try:
            if await self._read(receive, send, chunks, limit):
                return
        finally:
            self.pending -= sum(map(len, chunks))  # the whole body is the app's now (or dropped)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive, send: Send, chunks: list[bytes], limit: int) -> bool:
        """Read the body into ``chunks`` (counted in ``pending`` while there); True if it was answered
        instead (408, 413, 503) or the client left."""
        size = 0
        deadline = time.monotonic() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_error(send, APIError(408, f"The request body did not arrive within {self.read_timeout:g} "
                                                     "seconds.", code="request_timeout"), close=True)
                return True
            if message["type"] != "http.request":  # the client left before sending its body
                return True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, self._too_large(None, limit))
                return True
            if self.max_pending is not None and self.pending + len(chunk) > self.max_pending:
                await send_error(send, APIError(503, "The server is reading too many request bodies at once; retry "
                                                     "shortly.", type="server_error", code="server_busy"),
                                 close=True, retry_after=1)
                return True
            chunks.append(chunk)
            self.pending += len(chunk)
            if not message.get("more_body", False):
                return False


# Label values come from closed sets: a method outside these, like a path outside the routes, is 'other'.
# Raw values would let any client (these are counted before any key is checked) grow /metrics without bound.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetricsMiddleware:
    """Counts answered requests by method, route template and status (the status this server chose);
    methods and paths outside the known ones count as 'other'."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before answering, the server answers 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            # Templates, not raw paths: unknown paths would otherwise grow the label set without bound.
            name = getattr(route, "path", None) or "other"
            method = scope["method"] if scope["method"] in METRIC_METHODS else "other"
            self.metrics.requests.labels(method, name, str(status)).inc()
