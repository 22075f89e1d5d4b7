"""Server replicas as real processes (``t2serve serve``) on loopback ports, sharing one expert folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from bench.balancer import free_port
from bench.store import wait_ready
from server.config import Settings
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


@dataclass
class Replica:
    url: str
    port: int
    process: subprocess.Popen
    log: Path  # its stdout and stderr

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)


def serve_flags(settings: Settings) -> list[str]:
    """``t2serve serve`` flags for every field set explicitly in ``settings``."""
    flags = []
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


@contextmanager
def replica(settings: Settings, log: Path) -> Iterator[Replica]:
    """One server process; stopped with SIGTERM (then SIGKILL) when the block ends."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "server.cli", "serve", *serve_flags(settings), "--port", str(port),
           "--log-level", "warning"]  # no access log: what the log holds is what went wrong
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Replica(f"http://127.0.0.1:{port}", port, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@contextmanager
def replicas(settings: Settings, n: int, log_dir: Path) -> Iterator[list[Replica]]:
    """``n`` replicas of ``settings`` (started together, so their model loads overlap), all healthy."""
    with ExitStack() as stack:
        started = [stack.enter_context(replica(settings, log_dir / f"replica{i}.log")) for i in range(n)]
        for r in started:
            try:
                wait_ready(r.url, r.process, timeout=300)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{r.url}: {e}\n{r.log.read_text()[-4000:]}") from None
        yield started
