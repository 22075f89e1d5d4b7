"""Real server processes for the fault tests, started fast.

A server process spends most of its start importing torch and transformers. The ``Zygote`` is a process
that imports all that once and then forks one ``t2serve serve`` per request (it has no other thread, so
forking it is safe). A child can first arm a kill point (it SIGKILLs itself exactly there, see
``arm``), and can have a tiny model stand in for a GGUF file (the conversion's own steps, writing,
marking and renaming, are the real ones)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.balancer import free_port
from tests.support import REPO_ROOT

ROOT = REPO_ROOT

KILL_POINTS = ("svd: tensors half written", "svd: written, not renamed", "svd: renamed, folder not synced",
               "conversion: weights half written", "conversion: written, not marked complete",
               "conversion: marked, not renamed")


def _die(*_, **__) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_in_half(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def gguf_is_tiny(tiny: str | Path, patch=setattr) -> None:
    """"Dequantising" any .gguf loads the tiny model instead (``patch``: setattr, or a monkeypatch's)."""
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = auto.from_pretrained.__func__
        patch(auto, "from_pretrained", classmethod(
            lambda cls, path, *a, _real=real, gguf_file=None, **k: _real(cls, tiny if gguf_file else path, *a, **k)))


def arm(point: str) -> None:
    """Make this process SIGKILL itself at ``point`` (one of KILL_POINTS; "none": nowhere)."""
    import pathlib

    real_replace = os.replace
    if point == "svd: tensors half written":
        import adapters.svd_cache as sc

        real_save = sc.save_file

        def save_half(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            _cut_in_half(path)
            _die()

        sc.save_file = save_half
    elif point == "svd: written, not renamed":
        os.replace = lambda src, dst: _die() if "/svd/" in str(dst) else real_replace(src, dst)
    elif point == "svd: renamed, folder not synced":
        def replace_then_die(src, dst):
            real_replace(src, dst)
            if "/svd/" in str(dst):
                _die()

        os.replace = replace_then_die
    elif point == "conversion: weights half written":
        from transformers import PreTrainedModel

        real_save = PreTrainedModel.save_pretrained

        def save_half(self, folder, *a, **k):
            real_save(self, folder, *a, **k)
            _cut_in_half(next(p.path for p in os.scandir(folder) if p.name.endswith(".safetensors")))
            _die()

        PreTrainedModel.save_pretrained = save_half
    elif point == "conversion: written, not marked complete":
        real_write = pathlib.Path.write_text
        pathlib.Path.write_text = lambda self, *a, **k: (
            _die() if self.name == ".t2serve-complete" else real_write(self, *a, **k))
    elif point == "conversion: marked, not renamed":  # the temporary folder's rename into place
        os.replace = lambda src, dst: (
            _die() if os.path.isdir(src) and os.path.basename(src).startswith(".") else real_replace(src, dst))
    elif point != "none":
        raise ValueError(f"unknown kill point {point!r}")


ZYGOTE = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    # Imports only (no tensor work: a thread pool started here would not survive the forks).
    import torch, transformers, uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    from transformers.models.llama import modeling_llama, tokenization_llama
    import adapters.install, adapters.svd_cache, experts.store.expert_store, server.app, engine.native.async_engine
    import engine.loader
    from server.cli import main
    from tests.support.reliability.procs import arm, gguf_is_tiny

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "reap":
            print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(cmd["pid"], 0)[1])), flush=True)
            continue
        pid = os.fork()
        if pid == 0:  # the server: output to its log, the kill point armed, then `t2serve serve`
            log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                gguf_is_tiny(cmd["tiny"])
                arm(cmd["point"])
                code = main(cmd["argv"])
            finally:
                os._exit(code)
        print(json.dumps(pid), flush=True)
""").format(root=str(ROOT))


@dataclass
class ServerProcess:
    url: str
    pid: int
    zygote: "Zygote"

    def kill(self) -> int:
        """SIGKILL it (if it is still running) and return its exit code."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.zygote.reap(self.pid)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def adapted(self) -> bool:
        """Healthy with the adaptive layers ready too (base requests are served while the SVD still runs)."""
        try:
            r = httpx.get(self.url + "/health", timeout=5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("adaptation", {}).get("phase", "ready") == "ready"

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline or not _alive(self.pid):
                raise TimeoutError(f"{self.url} never became healthy:\n{self.zygote.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self


class Zygote:
    def __init__(self, tiny: Path, log: Path):
        self.tiny, self.log = tiny, log
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def _ask(self, cmd: dict) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the zygote died (exit {self.proc.wait()})")
        return json.loads(answer)

    def spawn(self, model: str | Path, cache: Path, experts: Path, point: str = "none") -> ServerProcess:
        """A ``t2serve serve`` process (fork) with ``point`` armed; see its output in ``self.log``."""
        port = free_port()
        argv = ["serve", "--model", str(model), "--served-model-name", "tiny", "--cache-dir", str(cache),
                "--expert-dir", str(experts), "--port", str(port), "--log-level", "warning", "--max-model-len", "256"]
        pid = self._ask({"op": "spawn", "point": point, "tiny": str(self.tiny), "argv": argv, "log": str(self.log)})
        return ServerProcess(f"http://127.0.0.1:{port}", pid, self)

    def reap(self, pid: int) -> int:
        return self._ask({"op": "reap", "pid": pid})

    def killed_at(self, point: str, model: str | Path, cache: Path, experts: Path, timeout: float = 120) -> None:
        """Start a server that SIGKILLs itself at ``point``; returns once it has (fails if it did not)."""
        srv = self.spawn(model, cache, experts, point)
        deadline = time.monotonic() + timeout
        # A point of the SVD cache is reached after /health answers 200 (the SVD runs in the background):
        # only a server whose adaptive layers are ready has gone past every point.
        while _alive(srv.pid) and not srv.adapted() and time.monotonic() < deadline:
            time.sleep(0.05)
        self_killed = not _alive(srv.pid)
        code = srv.kill()
        assert self_killed and code == -signal.SIGKILL, \
            f"not killed at {point!r} (exit {code}):\n{self.log.read_text()[-3000:]}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _alive(pid: int) -> bool:
    """Running (a child that has exited stays a zombie until reaped: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
