"""A round-robin TCP balancer on loopback for the replica tests: each new client connection goes to the
next backend, bytes are copied both ways: per connection and without stickiness, like the HAProxy of
docker/compose.replicas.yaml (which also health-checks and prefers the replica with fewer connections)."""
from __future__ import annotations

import asyncio
import itertools
import threading
from contextlib import contextmanager
from typing import Iterator


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextmanager
def round_robin(backends: list[tuple[str, int]]) -> Iterator[str]:
    """Serve on a free loopback port until the block ends; yields the balancer's base URL."""
    turn = itertools.cycle(backends)
    loop = asyncio.new_event_loop()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = next(turn)
        try:
            backend_r, backend_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.close()
