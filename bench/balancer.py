"""Load balancers on loopback, in front of server replicas started by the tests and benchmarks:

- ``haproxy``: HAProxy with ``docker/haproxy.cfg``, the compose file's configuration, its servers (found
  through Docker's DNS there) replaced by the given loopback backends.
- ``round_robin``: a small TCP balancer in this process for machines without HAProxy: each new client
  connection goes to the next backend and bytes are copied both ways (per connection, no stickiness,
  no health checks).
"""
from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
Backend = tuple[str, int]  # host, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def round_robin(backends: list[Backend]) -> Iterator[str]:
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
    async def shutdown() -> None:  # connections still open are cut, each closing its sockets
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def haproxy_config(backends: list[Backend], port: int, stats_port: int) -> str:
    config = (ROOT / "docker" / "haproxy.cfg").read_text()
    servers = "\n    ".join(f"server r{i} {host}:{p}" for i, (host, p) in enumerate(backends))
    for old, new in [("bind :8000", f"bind 127.0.0.1:{port}"), ("bind :8404", f"bind 127.0.0.1:{stats_port}"),
                     (" resolvers docker resolve-prefer ipv4 init-addr none", ""),
                     ("server-template replica 16 t2serve:8000", servers)]:
        assert old in config, f"docker/haproxy.cfg no longer has {old!r}"
        config = config.replace(old, new)
    return config


@contextmanager
def haproxy(backends: list[Backend], workdir: Path) -> Iterator[str]:
    """HAProxy (on PATH) with the compose file's configuration; yields its base URL."""
    port = free_port()
    path = workdir / "haproxy.cfg"
    path.write_text(haproxy_config(backends, port, free_port()))
    proc = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not start with {path}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
