"""Run untrusted generated Python (MBPP/HumanEval solutions and their tests) in a throw-away process.

Never in the calling process: every program runs in a fresh ``python -I -B`` child (``sandbox_boot.py``)
with, layered:
- a fresh temporary directory as cwd and HOME, removed afterwards; a minimal environment;
- hard resource limits: address space (memory bombs get MemoryError), CPU seconds, file size (also caps
  stdout/stderr, which go to files instead of pipes), no core dumps;
- a wall-clock timeout after which the whole process group is killed (sleeps and blocked reads);
- an audit hook that refuses writes/deletes outside the directory, sockets, subprocesses and ctypes;
- no network namespace at all when ``unshare -rn`` works on this machine (checked once).
The hook is a guard against accidents and careless code, not a security boundary against an adversary
who targets CPython itself; the process boundary and the limits are what protect the caller.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

BOOT = Path(__file__).with_name("sandbox_boot.py")
_TAIL = 2000  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write (stdout/stderr included)

    @property
    def cpu_s(self) -> int:
        return int(self.timeout_s) + 1


@dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout | memory | output_limit
    returncode: int | None
    stdout: str  # last characters
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The command prefix that gives the child no network (empty if unavailable here)."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [exe, "-rn"] if ok else []


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - _TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or returncode == -signal.SIGKILL:
        return "memory"
    return "failed"


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run ``source`` as a program; ``passed`` iff it exits 0 within the limits."""
    work = Path(tempfile.mkdtemp(prefix="t2sandbox-"))
    t0 = time.monotonic()
    timed_out = False
    try:
        (work / "prog.py").write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        cmd = [*network_isolation(), sys.executable, "-I", "-B", str(BOOT),
               str(limits.memory_mb), str(limits.cpu_s), str(limits.file_mb)]
        with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)  # its own process group: killed as a whole
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stderr = _tail(work / ".stderr")
        return RunResult(_status(proc.returncode, timed_out, stderr), proc.returncode, _tail(work / ".stdout"),
                         stderr, time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
             ) -> list[RunResult]:
    """``run_python`` over many programs, a few at a time (threads only wait on the children)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if len(sources) <= 1 or workers == 1:
        return [run_python(s, limits) for s in sources]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
